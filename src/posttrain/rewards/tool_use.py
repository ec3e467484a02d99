"""Rewards on how an agent used its tools, read from the episode's messages (the completion of a multi-turn
episode: `envs.sampling`).

`tool_efficiency` is OTC's tool-integrated reward (Wang et al. 2025, "OTC: Optimal Tool Calls via Reinforcement
Learning", arXiv:2504.14870, OTC-PPO's r_tool): a right answer is worth more the fewer tools it took,

    r = alpha * cos(m * pi / (2m + c)) * correct        m: the episode's tool calls; correct: 1 or 0

so m = 0 scores alpha, and each extra call less, towards 0 (cos -> cos(pi / 2)); a wrong answer scores 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from posttrain.rewards.verifiers import numeric_match


def count_tool_calls(completion: Any) -> int:
    """The tool calls of an episode's messages (each assistant message's `tool_calls`); 0 for plain text."""
    if isinstance(completion, str) or not isinstance(completion, Sequence):
        return 0
    return sum(len(m.get("tool_calls") or []) for m in completion if isinstance(m, Mapping) and
               m.get("role") == "assistant")  # fmt: skip


def tool_efficiency(
    *, completions: list[Any], answer: list[Any], alpha: float = 1.0, c: float = 1.0, **kwargs: Any
) -> list[float | None]:
    """OTC's tool-integrated reward (Wang et al. 2025, arXiv:2504.14870, OTC-PPO's r_tool) times correctness.

        r = alpha * cos(m * pi / (2m + c)) * correct     m: the episode's tool calls; correct: `numeric_match`

    completions: the episodes' messages (or text: no calls); answer: the gold answers. Returns one score each,
    None where the answer cannot be read.

    Deviations: OTC-GRPO's variant, which scores m against the fewest calls a right answer in the group took, is
    not implemented; c = 1 here (the paper leaves c to tune): one call keeps cos(pi / 3) = 0.5 of the reward.
    """
    correct = numeric_match(completions=completions, answer=answer)
    scores: list[float | None] = []
    for completion, right in zip(completions, correct, strict=True):
        if right is None:
            scores.append(None)
            continue
        m = count_tool_calls(completion)
        scores.append(alpha * math.cos(m * math.pi / (2 * m + c)) * right)
    return scores
