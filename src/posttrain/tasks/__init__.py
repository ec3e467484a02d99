"""Built-in verifiable tasks with seeded generators, verifiers and a tokenizer the project builds."""

from posttrain.tasks.arithmetic import ArithmeticTask, extract_answer, verify
from posttrain.tasks.tokenizer import build_tokenizer, save_tokenizer

TASKS = {"arithmetic": ArithmeticTask}

__all__ = ["TASKS", "ArithmeticTask", "build_tokenizer", "extract_answer", "save_tokenizer", "verify"]
