"""Built-in verifiable tasks with seeded generators, verifiers and a tokenizer the project builds."""

from typing import Any

from posttrain.tasks.arithmetic import ArithmeticTask, extract_answer, verify
from posttrain.tasks.counting import CountTask
from posttrain.tasks.guess_number import GuessNumberTask
from posttrain.tasks.ordering import SortTask
from posttrain.tasks.pattern import SequenceTask
from posttrain.tasks.strings import ReverseTask
from posttrain.tasks.tokenizer import (
    TOOL_TOKENS,
    TOOLS_CHATML_TEMPLATE,
    build_characters_tokenizer,
    build_tokenizer,
    save_tokenizer,
)

TASKS = {"arithmetic": ArithmeticTask, "guess_number": GuessNumberTask, "reverse": ReverseTask, "sort": SortTask,
         "count": CountTask, "sequence": SequenceTask}  # fmt: skip
"""Built-in tasks by name (`data.task.name`). Each has `sample` and a `verifier` (the built-in reward that checks
its answers; None for guess_number, whose environment scores the game); all but guess_number also make wrong
answers for preference pairs (`wrong_answer`)."""
SUITE_TASKS = ("reverse", "sort", "count", "sequence")
"""The learning suite's tasks (bench/learning_suite.py); they share the `characters` tokenizer."""
WRITTEN_TASKS = ("arithmetic", *SUITE_TASKS)
"""The tasks `posttrain task NAME` writes to files."""

BUILTIN_TOKENIZERS = ("arithmetic", "arithmetic-tools", "characters", *SUITE_TASKS)
"""`model.tokenizer` names the project builds: the arithmetic task's, the same task's for a calculator agent
(a larger vocabulary with the tool-call JSON's merges, `<tool_call>` tokens and a chat template with tools), and
`characters` (one token per character, no merges), which every task of the suite uses under its own name too."""


def build_builtin_tokenizer(name: str) -> Any:
    """The tokenizer of a built-in task. Its corpus is fixed, so the vocabulary is the same every time."""
    if name == "arithmetic-tools":
        return build_tools_tokenizer()
    if name == "characters" or name in SUITE_TASKS:
        return build_characters_tokenizer()
    if name != "arithmetic":
        return None
    return build_tokenizer(ArithmeticTask(digits=3, operators="+-*").corpus())


def build_tools_tokenizer() -> Any:
    corpus = ArithmeticTask(digits=3, operators="+-*").corpus()
    calls = [f'{{"name": "calculator", "arguments": {{"expression": "{text.split("=")[0]}"}}}}' for text in corpus]
    tokenizer = build_tokenizer([*corpus, *calls, "tools: calculator system tool"], vocab_size=512)
    tokenizer.add_tokens(list(TOOL_TOKENS))
    tokenizer.chat_template = TOOLS_CHATML_TEMPLATE
    return tokenizer


def verifier_of(task: str) -> str:
    """The built-in reward that checks a task's answers (`exact_match` or `numeric_match`)."""
    return TASKS[task].verifier


__all__ = [
    "BUILTIN_TOKENIZERS", "SUITE_TASKS", "TASKS", "WRITTEN_TASKS", "ArithmeticTask", "CountTask", "GuessNumberTask",
    "ReverseTask", "SequenceTask", "SortTask", "build_builtin_tokenizer", "build_tokenizer", "extract_answer",
    "save_tokenizer", "verifier_of", "verify",
]  # fmt: skip
