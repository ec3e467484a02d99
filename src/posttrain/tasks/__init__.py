"""Built-in verifiable tasks with seeded generators, verifiers and a tokenizer the project builds."""

from typing import Any

from posttrain.tasks.arithmetic import ArithmeticTask, extract_answer, verify
from posttrain.tasks.guess_number import GuessNumberTask
from posttrain.tasks.tokenizer import TOOL_TOKENS, TOOLS_CHATML_TEMPLATE, build_tokenizer, save_tokenizer

TASKS = {"arithmetic": ArithmeticTask, "guess_number": GuessNumberTask}


BUILTIN_TOKENIZERS = ("arithmetic", "arithmetic-tools")
"""`model.tokenizer` names the project builds: the arithmetic task's, and the same task's for a calculator agent
(a larger vocabulary with the tool-call JSON's merges, `<tool_call>` tokens and a chat template with tools)."""


def build_builtin_tokenizer(name: str) -> Any:
    """The tokenizer of a built-in task. Its corpus is fixed, so the vocabulary is the same every time."""
    if name == "arithmetic-tools":
        return build_tools_tokenizer()
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



__all__ = [
    "BUILTIN_TOKENIZERS", "TASKS", "ArithmeticTask", "GuessNumberTask", "build_builtin_tokenizer", "build_tokenizer",
    "extract_answer", "save_tokenizer", "verify",
]  # fmt: skip
