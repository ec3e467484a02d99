"""Multi-digit arithmetic: `37+58=` -> `95`. The built-in verifiable task for the demo, tests and benches.

Train and held-out problems never overlap: a problem's split is a fixed function of the problem itself
(a CRC of its text), so any seed, size or generator call agrees on it.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass
from typing import Literal

Split = Literal["train", "eval"]
OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_NUMBER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class ArithmeticTask:
    """Problems `a<op>b=` with operands of 1 to `digits` digits."""

    digits: int = 2
    """Largest number of digits in an operand."""
    operators: str = "+-"
    """Operators to draw from, any of `+-*`."""
    heldout_per_mille: int = 100
    """Share of all problems (per thousand) reserved for the held-out split."""

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

    def row(self, a: int, op: str, b: int) -> dict[str, str]:
        answer = str(OPERATORS[op](a, b))
        return {"prompt": f"{a}{op}{b}=", "completion": answer, "answer": answer}

    def split_of(self, a: int, op: str, b: int) -> Split:
        bucket = zlib.crc32(f"{a}{op}{b}".encode()) % 1000
        return "eval" if bucket < self.heldout_per_mille else "train"

    def sample(self, n: int, *, seed: int, split: Split = "train") -> list[dict[str, str]]:
        """`n` problems of one split, drawn with replacement from that split by a seeded generator."""
        rng = random.Random(f"{seed}-{split}")
        rows = []
        while len(rows) < n:
            a, op, b = self._draw_operand(rng), rng.choice(self.operators), self._draw_operand(rng)
            if self.split_of(a, op, b) == split:
                rows.append(self.row(a, op, b))
        return rows

    def _draw_operand(self, rng: random.Random) -> int:
        # Uniform over the digit count first, so short operands are not drowned out by long ones.
        d = rng.randint(1, self.digits)
        return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)

    def corpus(self, n: int = 2000) -> list[str]:
        """Text to train the tokenizer on: every character the task's prompts and answers use."""
        return [r["prompt"] + r["completion"] for r in self.sample(n, seed=0)]


def extract_answer(completion: str) -> str | None:
    """The first integer in the completion (the task's answers are integers), or None."""
    match = _NUMBER.search(completion)
    return match.group(0) if match else None


def verify(completion: str, answer: str) -> bool:
    """True when the completion's first integer equals the expected answer."""
    predicted = extract_answer(completion)
    return predicted is not None and int(predicted) == int(answer)
