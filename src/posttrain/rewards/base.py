"""The reward protocol, the spec a recipe names a reward with, and the errors of this layer.

A reward function is called the way TRL's `GRPOTrainer` calls one, so a TRL user's function works
unchanged:

    fn(prompts=[...], completions=[...], completion_ids=[[...], ...], **columns) -> list[float | None]

- `prompts`, `completions`: N strings, or N conversations (lists of `{role, content}` messages).
- `completion_ids`: N lists of token ids, the completions as sampled.
- `columns`: every other field of the dataset rows, one list of N values per field (`answer=[...]`).
- Returns N scores, one per completion. `None` means "does not apply to this sample" (TRL turns it
  into NaN and ignores it in the weighted sum); posttrain does the same: it is logged as NaN in the
  reward's own column, left out of that reward's mean, and adds 0 to the total. It is not a failure.

Functions should accept `**kwargs`, because every column is passed to every function.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class RewardFunction(Protocol):
    """What `RewardSet` calls. Plain functions and callable objects both qualify."""

    def __call__(
        self,
        *,
        prompts: list[Any],
        completions: list[Any],
        completion_ids: list[list[int]],
        **columns: Any,
    ) -> Sequence[float | None]: ...


@dataclass
class RewardSpec:
    """One reward of a recipe, e.g. `{fn: overlong_penalty, weight: 1.0, args: {max_new_tokens: 32}}`.

    The config layer builds these from YAML; `RewardSet.from_specs` turns them into callables.
    """

    fn: str
    """A built-in name (`posttrain.rewards.BUILTIN_REWARDS`), `package.module:function`, or
    `path/to/file.py:function` (relative to the recipe's directory, then to the working directory)."""
    weight: float = 1.0
    """Multiplies this reward's scores in the total."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments: bound to a function on every call, or given to a class's constructor once."""
    timeout_s: float | None = 30.0
    """Seconds one call may take before its samples score `failure_score`; None waits forever and runs
    the call in the caller's thread (no thread hand-off at all)."""
    failure_score: float = 0.0
    """Score of a sample whose reward failed (raised, timed out, returned NaN/inf or a non-number)."""
    name: str | None = None
    """Name in logs and metrics; defaults to the function's name. Must be unique within a set."""

    def __post_init__(self) -> None:
        where = f"reward '{self.name or self.fn}'"
        if not isinstance(self.fn, str) or not self.fn:
            raise ValueError(f"{where}: fn must be a non-empty string, got {self.fn!r}")
        if not math.isfinite(self.weight):
            raise ValueError(f"{where}: weight must be a finite number, got {self.weight!r}")
        if not isinstance(self.args, Mapping):
            raise ValueError(f"{where}: args must be a mapping of keyword arguments, got {self.args!r}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"{where}: timeout_s must be > 0 or None (no limit), got {self.timeout_s!r}")
        if not math.isfinite(self.failure_score):
            raise ValueError(f"{where}: failure_score must be a finite number, got {self.failure_score!r}")


class RewardLoadError(ValueError):
    """A reward spec that cannot be turned into a callable (unknown name, missing file or attribute)."""


class RewardFailureError(RuntimeError):
    """More of a call's samples failed than `max_failure_fraction` allows."""


def completion_text(completion: Any) -> str:
    """The text a verifier checks: the string itself, or the last message's content of a conversation.

    The last message, because in a multi-turn completion (tool calls, then an answer) the final answer
    is in the final assistant turn, which is what TRL's conversational rewards read for one-turn ones.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        return _content_text(completion[-1].get("content", ""))
    raise TypeError(
        f"completion must be a string or a list of {{role, content}} messages, got {type(completion).__name__}"
    )


def _content_text(content: Any) -> str:
    # Multimodal chat messages hold a list of parts, e.g. [{"type": "text", "text": "..."}].
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    return str(content)
