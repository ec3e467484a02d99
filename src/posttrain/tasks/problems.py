"""What the generated tasks share: a seeded generator over disjoint splits, noisy demonstrations, and the two kinds
of wrong answer that preference pairs and noisy demonstrations are built from.

A problem's split is a fixed function of its prompt (a CRC of the text), so any seed, size or generator call
agrees on it and the train and held-out splits never share a problem.

A wrong answer is either a near miss, one token or one swap away from the right one (`37+58=` -> `96`, `dcba` ->
`dcab`), or clearly different (`37+58=` -> `12`, `dcba` -> `hfgj`). Noisy demonstrations (`wrong_fraction`) state a
near miss, as a careless demonstrator would; the row's `answer` stays the right one, so verifiers, rewards and
held-out accuracy read the truth.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import ClassVar, Literal

Split = Literal["train", "eval"]
Rejected = Literal["near_duplicate", "different"]


def split_of(prompt: str, heldout_per_mille: int) -> Split:
    """The split a problem belongs to: its prompt's CRC-32 modulo 1000 below `heldout_per_mille` is held out."""
    return "eval" if zlib.crc32(prompt.encode()) % 1000 < heldout_per_mille else "train"


def check_fraction(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{key} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class GeneratedTask:
    """A task whose problems a seeded generator draws: `draw` gives one (prompt, answer); `near_miss` and
    `different_answer` give wrong answers. `verifier` names the built-in reward that checks a completion."""

    heldout_per_mille: int = 100
    """Share of all problems (per thousand) reserved for the held-out split."""
    wrong_fraction: float = 0.0
    """Share of demonstrations whose completion is a near miss instead of the answer (noisy demonstrations)."""

    name: ClassVar[str] = ""
    verifier: ClassVar[str] = "exact_match"

    def __post_init__(self) -> None:
        if not 0 < self.heldout_per_mille < 1000:
            raise ValueError(f"{self.name}.heldout_per_mille must be in 1..999, got {self.heldout_per_mille}")
        check_fraction(f"{self.name}.wrong_fraction", self.wrong_fraction)

    def draw(self, rng: random.Random) -> tuple[str, str]:
        raise NotImplementedError

    def near_miss(self, answer: str, rng: random.Random) -> str:
        raise NotImplementedError

    def different_answer(self, answer: str, rng: random.Random) -> str:
        raise NotImplementedError

    def wrong_answer(self, answer: str, rng: random.Random, kind: Rejected) -> str:
        return self.near_miss(answer, rng) if kind == "near_duplicate" else self.different_answer(answer, rng)

    def sample(self, n: int, *, seed: int, split: Split = "train") -> list[dict[str, str]]:
        """`n` rows {prompt, completion, answer} of one split, drawn with replacement by a seeded generator."""
        rng = random.Random(f"{seed}-{split}")
        noise = random.Random(f"{seed}-{split}-wrong")  # its own stream: the problems drawn do not depend on it
        rows = []
        while len(rows) < n:
            prompt, answer = self.draw(rng)
            if split_of(prompt, self.heldout_per_mille) == split:
                wrong = noise.random() < self.wrong_fraction
                completion = self.near_miss(answer, noise) if wrong else answer
                rows.append({"prompt": prompt, "completion": completion, "answer": answer})
        return rows

    def corpus(self, n: int = 2000) -> list[str]:
        """Text to train a tokenizer on: the characters the task's prompts and answers use."""
        return [r["prompt"] + r["completion"] for r in self.sample(n, seed=0)]


def swap_adjacent(text: str, rng: random.Random, alphabet: str) -> str:
    """`text` with two adjacent, different characters swapped (`dcba` -> `dcab`); a text without such a pair
    (`aaa`) gets one character replaced instead. Never equal to `text`."""
    pairs = [i for i in range(len(text) - 1) if text[i] != text[i + 1]]
    if pairs:
        i = rng.choice(pairs)
        return text[:i] + text[i + 1] + text[i] + text[i + 2 :]
    i = rng.randrange(len(text))
    return text[:i] + rng.choice([c for c in alphabet if c != text[i]]) + text[i + 1 :]


def distant_string(text: str, rng: random.Random, alphabet: str) -> str:
    """A string of `text`'s length over `alphabet` that differs from it in at least half of its positions (and
    at least 2 when it is that long): a clearly different answer."""
    needed = min(len(text), max(2, (len(text) + 1) // 2))
    while True:
        other = "".join(rng.choice(alphabet) for _ in text)
        if sum(a != b for a, b in zip(text, other, strict=True)) >= needed:
            return other


def digit_slip(answer: str, rng: random.Random) -> str:
    """`answer` with one digit moved by +-1 (a carry error); never equal to `answer`."""
    value = int(answer)
    place = 10 ** rng.randrange(len(answer.lstrip("-")))
    wrong = value + rng.choice((-1, 1)) * place
    return str(wrong)


def distant_number(answer: str, rng: random.Random, *, low: int, high: int, gap: int) -> str:
    """A number in [low, high] at least `gap` away from `answer`: a clearly different answer."""
    value = int(answer)
    choices = [v for v in range(low, high + 1) if abs(v - value) >= gap]
    return str(rng.choice(choices))
