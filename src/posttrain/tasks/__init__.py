"""Built-in verifiable tasks with seeded generators, verifiers and a tokenizer the project builds."""

from typing import Any

from posttrain.tasks.arithmetic import ArithmeticTask, extract_answer, verify
from posttrain.tasks.tokenizer import build_tokenizer, save_tokenizer

TASKS = {"arithmetic": ArithmeticTask}


def build_builtin_tokenizer(name: str) -> Any:
    """The tokenizer of a built-in task. Its corpus is fixed, so the vocabulary is the same every time."""
    if name not in TASKS:
        return None
    return build_tokenizer(ArithmeticTask(digits=3, operators="+-*").corpus())



__all__ = [
    "TASKS", "ArithmeticTask", "build_builtin_tokenizer", "build_tokenizer", "extract_answer", "save_tokenizer",
    "verify",
]  # fmt: skip
