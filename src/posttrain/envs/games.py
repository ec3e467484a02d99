"""Games: multi-step environments whose reward needs several turns.

`guess_number`: the environment holds a secret integer in [low, high]; each model turn guesses one (the last
integer it writes, after any `</think>`), and the reply, a user message, says "higher", "lower" or "correct".
The episode ends when the guess is right (environment reward 1.0 on that turn) or after `max_guesses` (reward 0.0
on the last one); a turn without a number counts as a wrong guess and is told so. Binary search over [1, 16]
needs up to 4 guesses, so a single answer is right only by chance.

    env: {name: guess_number, args: {low: 1, high: 16, max_guesses: 5}}
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from typing import Any

from posttrain.envs.base import StepResult
from posttrain.envs.chat import ChatTranscript, conversation_of

_INTEGER = re.compile(r"-?\d+")


def last_integer(text: str) -> int | None:
    found = _INTEGER.findall(text.rpartition("</think>")[2])
    return int(found[-1]) if found else None


class GuessNumberEnv:
    """Guess-the-number with higher/lower replies (see the module docstring). The secret is the row's `column`
    (`secret`) when it has one, else drawn from the row's prompt with a fixed seed, so a group shares it."""

    def __init__(self, tokenizer: Any, *, low: int = 1, high: int = 16, max_guesses: int = 5, column: str = "secret",
                 template_kwargs: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        if low > high or max_guesses < 1:
            raise ValueError(f"guess_number: need low <= high and max_guesses >= 1, got {low}, {high}, {max_guesses}")
        self.low, self.high, self.max_guesses, self.column = low, high, max_guesses, column
        self.transcript = ChatTranscript(tokenizer, template_kwargs=template_kwargs)
        self.secret, self.guesses, self.solved = low, 0, False

    def reset(self, row: dict[str, Any]) -> list[int]:
        prompt = row.get("prompt") or f"Guess my number between {self.low} and {self.high}."
        secret = row.get(self.column)
        self.secret = int(secret) if secret is not None else random.Random(str(prompt)).randint(self.low, self.high)
        return self.transcript.start(conversation_of(prompt))

    def step(self, completion_ids: list[int]) -> StepResult:
        text, ended = self.transcript.model_text(completion_ids)
        guess = last_integer(text)
        self.guesses += 1
        self.solved = guess == self.secret
        out_of_guesses = self.guesses >= self.max_guesses
        if self.solved or out_of_guesses or not ended:
            self.transcript.close([{"role": "assistant", "content": text}])
            return StepResult([], done=True, info=self.info(), reward=1.0 if self.solved else 0.0)
        reply = "say a number" if guess is None else ("higher" if guess < self.secret else "lower")
        observation, context = self.transcript.extend([{"role": "assistant", "content": text},
                                                       {"role": "user", "content": reply}])  # fmt: skip
        return StepResult(observation, done=False, info=self.info(), context_ids=context)

    def info(self) -> dict[str, Any]:
        return {"messages": self.transcript.completion_messages, "guesses": self.guesses, "solved": int(self.solved),
                "splits": self.transcript.splits}  # fmt: skip
