"""Multi-digit arithmetic: `37+58=` -> `95`. The built-in verifiable task for the demo, tests and benches.

Train and held-out problems never overlap: a problem's split is a fixed function of the problem itself
(a CRC of its text), so any seed, size or generator call agrees on it.

A share of the demonstrations (`think_fraction`) can work the problem out first, column by column from
the units, inside `<think>...</think>` (DeepSeek-R1's output format, arXiv:2501.12948), then state the
answer: `37+58=` -> `<think>7+8=15;3+5+1=9</think>95`. The answer is always the text after the working.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass
from typing import ClassVar

from posttrain.tasks.problems import Rejected, Split, check_fraction, digit_slip

OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_NUMBER = re.compile(r"-?\d+")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class ArithmeticTask:
    """Problems `a<op>b=` with operands of 1 to `digits` digits."""

    digits: int = 2
    """Largest number of digits in an operand."""
    operators: str = "+-"
    """Operators to draw from, any of `+-*`."""
    heldout_per_mille: int = 100
    """Share of all problems (per thousand) reserved for the held-out split."""
    think_fraction: float = 0.0
    """Share of rows whose completion works the problem out in `<think>...</think>` before the answer."""
    tool_fraction: float | None = None
    """None: text rows. A number: conversational rows for an agent (a user message; `tools` holds the
    calculator's schema), of which this share of demonstrations calls the calculator on the problem and answers
    with its result; the rest answer directly (`tool_row`)."""
    wrong_fraction: float = 0.0
    """Share of demonstrations that state a near miss (`digit_slip`) instead of the answer (noisy demonstrations);
    the row's `answer` stays the right one."""

    name: ClassVar[str] = "arithmetic"
    verifier: ClassVar[str] = "numeric_match"

    def __post_init__(self) -> None:
        if self.digits < 1:
            raise ValueError(f"arithmetic.digits must be >= 1, got {self.digits}")
        unknown = set(self.operators) - set(OPERATORS)
        if not self.operators or unknown:
            raise ValueError(
                f"arithmetic.operators: {self.operators!r}; allowed: any of {''.join(OPERATORS)}"
            )
        if not 0 < self.heldout_per_mille < 1000:
            raise ValueError(f"arithmetic.heldout_per_mille must be in 1..999, got {self.heldout_per_mille}")
        if not 0.0 <= self.think_fraction <= 1.0:
            raise ValueError(f"arithmetic.think_fraction must be in [0, 1], got {self.think_fraction}")
        if self.think_fraction > 0 and "*" in self.operators:
            raise ValueError("arithmetic.think_fraction: worked demonstrations cover + and - only, not *")
        if self.tool_fraction is not None and not 0.0 <= self.tool_fraction <= 1.0:
            raise ValueError(f"arithmetic.tool_fraction must be in [0, 1], got {self.tool_fraction}")
        if self.tool_fraction is not None and self.think_fraction > 0:
            raise ValueError("arithmetic: tool_fraction and think_fraction cannot both be set")
        check_fraction("arithmetic.wrong_fraction", self.wrong_fraction)

    def row(self, a: int, op: str, b: int, *, worked: bool = False) -> dict[str, str]:
        """The problem, its completion (the answer, or `worked_completion` when `worked`) and its answer."""
        answer = str(OPERATORS[op](a, b))
        completion = worked_completion(a, op, b, columns=self.digits) if worked else answer
        return {"prompt": f"{a}{op}{b}=", "completion": completion, "answer": answer}

    def split_of(self, a: int, op: str, b: int) -> Split:
        bucket = zlib.crc32(f"{a}{op}{b}".encode()) % 1000
        return "eval" if bucket < self.heldout_per_mille else "train"

    def sample(self, n: int, *, seed: int, split: Split = "train") -> list[dict[str, str]]:
        """`n` problems of one split, drawn with replacement from that split by a seeded generator."""
        rng = random.Random(f"{seed}-{split}")
        think = random.Random(f"{seed}-{split}-think")  # its own stream: the problems drawn do not depend on it
        noise = random.Random(f"{seed}-{split}-wrong")
        rows = []
        while len(rows) < n:
            a, op, b = self._draw_operand(rng), rng.choice(self.operators), self._draw_operand(rng)
            if self.split_of(a, op, b) == split:
                chance = think.random()
                if self.tool_fraction is None:
                    rows.append(self.row(a, op, b, worked=chance < self.think_fraction))
                else:
                    rows.append(tool_row(a, op, b, call=chance < self.tool_fraction))
                if noise.random() < self.wrong_fraction and self.tool_fraction is None:
                    rows[-1]["completion"] = digit_slip(rows[-1]["answer"], noise)
        return rows

    def near_miss(self, answer: str, rng: random.Random) -> str:
        """One digit off by one (a carry or borrow slip): `95` -> `85` or `96`."""
        return digit_slip(answer, rng)

    def different_answer(self, answer: str, rng: random.Random) -> str:
        """A number 10 to 10^digits away: `95` -> `12`."""
        return str(int(answer) + rng.choice((-1, 1)) * rng.randint(10, 10**self.digits))

    def wrong_answer(self, answer: str, rng: random.Random, kind: Rejected) -> str:
        return self.near_miss(answer, rng) if kind == "near_duplicate" else self.different_answer(answer, rng)

    def _draw_operand(self, rng: random.Random) -> int:
        # Uniform over the digit count first, so short operands are not drowned out by long ones.
        d = rng.randint(1, self.digits)
        return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)

    def corpus(self, n: int = 2000) -> list[str]:
        """Text to train the tokenizer on: every character the task's prompts and answers use."""
        return [r["prompt"] + r["completion"] for r in self.sample(n, seed=0)]


def tool_row(a: int, op: str, b: int, *, call: bool) -> dict:
    """A conversational row for a calculator agent: the problem as a user message, the calculator's schema in
    `tools`, and a demonstration that calls the calculator and answers with its result (`call`), or answers
    directly. TRL's tool-use format (assistant `tool_calls`, a `tool` message)."""
    from posttrain.envs.builtin_tools import calculator  # the tool the agent's environment offers
    from posttrain.envs.tools import Tool

    expression, answer = f"{a}{op}{b}", str(OPERATORS[op](a, b))
    completion = [{"role": "assistant", "content": answer}]
    if call:
        tool_call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}
        completion = [{"role": "assistant", "content": "", "tool_calls": [tool_call]},
                      {"role": "tool", "name": "calculator", "content": answer}, *completion]  # fmt: skip
    return {"prompt": [{"role": "user", "content": f"{expression}="}], "completion": completion, "answer": answer,
            "tools": [Tool.from_function(calculator).schema]}  # fmt: skip


def worked_completion(a: int, op: str, b: int, *, columns: int) -> str:
    """`a op b` worked out in `columns` columns from the units, in `<think>`, then the answer.

        37+58 -> <think>7+8=15;3+5+1=9</think>95          each column: digits + carry = sum
        73-58 -> <think>13-8=5;7-1-5=1</think>15          a column short of its subtrahend borrows 10
        23-58 -> <think>-;8-3=5;5-0-2=3</think>-35        a < b: "-", then b - a
    """
    if op == "+":
        steps = _addition_columns(a, b, columns)
    elif op == "-":
        steps = _subtraction_columns(a, b, columns) if a >= b else ["-", *_subtraction_columns(b, a, columns)]
    else:
        raise ValueError(f"worked demonstrations cover + and - only, not {op!r}")
    return f"{THINK_OPEN}{';'.join(steps)}{THINK_CLOSE}{OPERATORS[op](a, b)}"


def _column_digits(x: int, columns: int) -> list[int]:
    return [x // 10**i % 10 for i in range(columns)]  # units first


def _addition_columns(a: int, b: int, columns: int) -> list[str]:
    steps, carry = [], 0
    for i, (x, y) in enumerate(zip(_column_digits(a, columns), _column_digits(b, columns), strict=True)):
        total = x + y + carry
        steps.append(f"{x}+{y}={total}" if i == 0 else f"{x}+{y}+{carry}={total}")
        carry = total // 10
    return steps


def _subtraction_columns(a: int, b: int, columns: int) -> list[str]:
    """Columns of a - b for a >= b."""
    steps, borrow = [], 0
    for i, (x, y) in enumerate(zip(_column_digits(a, columns), _column_digits(b, columns), strict=True)):
        lends = x - borrow < y
        top = f"1{x}" if lends else f"{x}"
        difference = 10 * lends + x - borrow - y
        steps.append(f"{top}-{y}={difference}" if i == 0 else f"{top}-{borrow}-{y}={difference}")
        borrow = int(lends)
    return steps


def extract_answer(completion: str) -> str | None:
    """The first integer after the last `</think>` (or in the whole completion when it has none), or None."""
    match = _NUMBER.search(completion.rpartition(THINK_CLOSE)[2])
    return match.group(0) if match else None


def verify(completion: str, answer: str) -> bool:
    """True when the completion's first integer equals the expected answer."""
    predicted = extract_answer(completion)
    return predicted is not None and int(predicted) == int(answer)
