"""Pattern completion: the next term of an arithmetic sequence (`next 4,7,10,13=` -> `16`)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from posttrain.tasks.problems import GeneratedTask, digit_slip, distant_number


@dataclass(frozen=True)
class SequenceTask(GeneratedTask):
    """`terms` (3 or 4, drawn) terms of a sequence start, start + step, ... with start in [0, `max_start`] and a
    step of 1 to `max_step` up or down; every term and the answer are >= 0."""

    max_start: int = 199
    """Largest first term."""
    max_step: int = 9
    """Largest step (in absolute value)."""

    name: ClassVar[str] = "sequence"
    verifier: ClassVar[str] = "numeric_match"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_start < 0 or self.max_step < 1:
            raise ValueError(f"sequence: need max_start >= 0 and max_step >= 1, got {self.max_start}, {self.max_step}")

    def draw(self, rng: random.Random) -> tuple[str, str]:
        while True:
            start, step, shown = rng.randint(0, self.max_start), rng.randint(1, self.max_step), rng.choice((3, 4))
            step *= rng.choice((-1, 1))
            terms = [start + i * step for i in range(shown + 1)]
            if min(terms) >= 0:
                return "next " + ",".join(map(str, terms[:-1])) + "=", str(terms[-1])

    def near_miss(self, answer: str, rng: random.Random) -> str:
        wrong = digit_slip(answer, rng)
        return wrong if int(wrong) >= 0 else str(int(answer) + 1)

    def different_answer(self, answer: str, rng: random.Random) -> str:
        top = self.max_start + 4 * self.max_step
        return distant_number(answer, rng, low=0, high=top, gap=10)
