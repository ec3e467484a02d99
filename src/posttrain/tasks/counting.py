"""Counting: how often a letter occurs in a string (`count b in abbcab=` -> `3`)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from posttrain.tasks.problems import GeneratedTask, distant_number


@dataclass(frozen=True)
class CountTask(GeneratedTask):
    """Strings of `min_length` to `max_length` letters from `alphabet`; the answer counts one letter of it."""

    alphabet: str = "abcd"
    """Letters the string and the counted letter are drawn from."""
    min_length: int = 4
    """Fewest letters in the string."""
    max_length: int = 9
    """Most letters in the string (at most 9, so that every count is one digit)."""

    name: ClassVar[str] = "count"
    verifier: ClassVar[str] = "numeric_match"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.min_length <= self.max_length <= 9:
            raise ValueError(f"count: need 1 <= min_length <= max_length <= 9, got {self.min_length}, "
                             f"{self.max_length}")  # fmt: skip
        if len(set(self.alphabet)) < 2 or not self.alphabet.isalpha():
            raise ValueError(f"count.alphabet: {self.alphabet!r}; give at least 2 distinct letters")

    def draw(self, rng: random.Random) -> tuple[str, str]:
        text = "".join(rng.choice(self.alphabet) for _ in range(rng.randint(self.min_length, self.max_length)))
        letter = rng.choice(self.alphabet)
        return f"count {letter} in {text}=", str(text.count(letter))

    def near_miss(self, answer: str, rng: random.Random) -> str:
        value = int(answer)
        return str(value + 1 if value == 0 else value + rng.choice((-1, 1)))

    def different_answer(self, answer: str, rng: random.Random) -> str:
        return distant_number(answer, rng, low=0, high=self.max_length, gap=3)
