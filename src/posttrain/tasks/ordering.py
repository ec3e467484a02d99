"""Ordering: sort a string of digits (`sort 3912=` -> `1239`). The answer is the same digits in ascending order."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from posttrain.tasks.problems import GeneratedTask, distant_string, swap_adjacent

DIGITS = "0123456789"


@dataclass(frozen=True)
class SortTask(GeneratedTask):
    """Strings of `min_length` to `max_length` digits (repeats allowed), to be sorted ascending."""

    min_length: int = 3
    """Fewest digits to sort."""
    max_length: int = 6
    """Most digits to sort."""

    name: ClassVar[str] = "sort"
    verifier: ClassVar[str] = "exact_match"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 2 <= self.min_length <= self.max_length:
            raise ValueError(f"sort: need 2 <= min_length <= max_length, got {self.min_length}, {self.max_length}")

    def draw(self, rng: random.Random) -> tuple[str, str]:
        digits = "".join(rng.choice(DIGITS) for _ in range(rng.randint(self.min_length, self.max_length)))
        return f"sort {digits}=", "".join(sorted(digits))

    def near_miss(self, answer: str, rng: random.Random) -> str:
        return swap_adjacent(answer, rng, DIGITS)

    def different_answer(self, answer: str, rng: random.Random) -> str:
        return distant_string(answer, rng, DIGITS)
