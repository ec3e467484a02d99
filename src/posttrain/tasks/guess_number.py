"""Guess-the-number games as conversations: the rows the `guess_number` environment plays (`envs.games`) and
demonstrations of two strategies for a warm start.

A game: the user asks for a number in [low, high]; each assistant turn is a guess (the number alone); each user turn
says "higher" or "lower", as the environment replies; the game ends on the right guess or after `max_guesses`.

- binary search (`search_fraction` of the demonstrations): guess the middle of what is still possible,
  (lo + hi) // 2. It finds any secret of [1, 16] within 5 guesses.
- counting up (the rest): guess the smallest number still possible. Within 5 guesses it finds only the 5 smallest.

    8 / higher / 12 / lower / 10 / higher / 11          binary search, secret 11
    1 / higher / 2 / higher / 3                         counting up, secret 3

There are only high - low + 1 games: the held-out split plays every secret once (in turn, `eval_size` rows), not
games the training rows lack.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

Split = Literal["train", "eval"]


@dataclass(frozen=True)
class GuessNumberTask:
    """Games over [low, high] with at most `max_guesses` guesses (see the module docstring)."""

    verifier: ClassVar[str | None] = None  # the environment scores a game, no reward checks an answer

    low: int = 1
    """Smallest secret."""
    high: int = 16
    """Largest secret."""
    max_guesses: int = 5
    """Guesses a game allows; the environment's `max_guesses` must be the same."""
    search_fraction: float = 1.0
    """Share of demonstrations that play binary search; the rest count up from the smallest number still possible."""

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError(f"guess_number: low={self.low} is above high={self.high}")
        if self.max_guesses < 1:
            raise ValueError(f"guess_number: max_guesses must be >= 1, got {self.max_guesses}")
        if not 0.0 <= self.search_fraction <= 1.0:
            raise ValueError(f"guess_number: search_fraction must be in [0, 1], got {self.search_fraction}")

    @property
    def question(self) -> str:
        return f"Guess my number between {self.low} and {self.high}."

    def game(self, secret: int, *, search: bool) -> list[dict[str, str]]:
        """The messages after the question: guesses and replies until the right guess or `max_guesses`."""
        lo, hi, messages = self.low, self.high, []
        for k in range(self.max_guesses):
            guess = (lo + hi) // 2 if search else lo
            messages.append({"role": "assistant", "content": str(guess)})
            if guess == secret or k + 1 == self.max_guesses:
                break
            if guess < secret:
                lo = guess + 1
                messages.append({"role": "user", "content": "higher"})
            else:
                hi = guess - 1
                messages.append({"role": "user", "content": "lower"})
        return messages

    def row(self, secret: int, *, search: bool) -> dict[str, Any]:
        return {"prompt": [{"role": "user", "content": self.question}], "completion": self.game(secret, search=search),
                "answer": str(secret), "secret": secret}  # fmt: skip

    def sample(self, n: int, *, seed: int, split: Split = "train") -> list[dict[str, Any]]:
        """`n` games: random secrets for training, every secret in turn for the held-out split; a seeded
        `search_fraction` of them binary search."""
        rng = random.Random(f"{seed}-{split}-guess")
        strategy = random.Random(f"{seed}-{split}-strategy")  # its own stream: the secrets do not depend on it
        span = self.high - self.low + 1
        secrets = [self.low + i % span for i in range(n)] if split == "eval" else \
            [rng.randint(self.low, self.high) for _ in range(n)]  # fmt: skip
        return [self.row(s, search=strategy.random() < self.search_fraction) for s in secrets]
