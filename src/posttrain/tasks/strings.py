"""String transforms: reverse a word (`rev abcd=` -> `dcba`). The answer is the word spelled backwards."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from posttrain.tasks.problems import GeneratedTask, distant_string, swap_adjacent


@dataclass(frozen=True)
class ReverseTask(GeneratedTask):
    """Words of `min_length` to `max_length` letters from `alphabet`, to be written backwards."""

    alphabet: str = "abcdefghij"
    """Letters a word is drawn from."""
    min_length: int = 3
    """Fewest letters in a word."""
    max_length: int = 5
    """Most letters in a word."""

    name: ClassVar[str] = "reverse"
    verifier: ClassVar[str] = "exact_match"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 2 <= self.min_length <= self.max_length:
            raise ValueError(f"reverse: need 2 <= min_length <= max_length, got {self.min_length}, {self.max_length}")
        if len(set(self.alphabet)) < 2 or not self.alphabet.isalpha():
            raise ValueError(f"reverse.alphabet: {self.alphabet!r}; give at least 2 distinct letters")

    def draw(self, rng: random.Random) -> tuple[str, str]:
        word = "".join(rng.choice(self.alphabet) for _ in range(rng.randint(self.min_length, self.max_length)))
        return f"rev {word}=", word[::-1]

    def near_miss(self, answer: str, rng: random.Random) -> str:
        return swap_adjacent(answer, rng, self.alphabet)

    def different_answer(self, answer: str, rng: random.Random) -> str:
        return distant_string(answer, rng, self.alphabet)
