"""Length shaping: rewards that depend only on how many tokens a completion has."""

from __future__ import annotations

from typing import Any


def length_penalty(
    *,
    completion_ids: list[list[int]],
    penalty_per_token: float = 1e-3,
    free_tokens: int = 0,
    **kwargs: Any,
) -> list[float]:
    """Linear length penalty: r = -penalty_per_token * max(0, |y| - free_tokens), |y| in tokens.

    `free_tokens` lets a budget go unpunished; with the defaults a 200-token completion scores -0.2.
    """
    return [-penalty_per_token * max(0, len(ids) - free_tokens) for ids in completion_ids]


class OverlongPenalty:
    """DAPO soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, Eq. 13).

        L_max = max_new_tokens, L_cache = overlong_buffer, |y| = completion length in tokens

        R(y) = 0                                  if |y| <= L_max - L_cache
             = ((L_max - L_cache) - |y|) / L_cache if L_max - L_cache < |y| <= L_max
             = -1                                 if L_max < |y|

    Added to the task reward. DAPO used L_max = 20480 with L_cache = 4096 (16384 expected tokens).
    Deviations from the paper: none. (The third case cannot happen when generation stops at
    `max_new_tokens`; it is kept for completions produced elsewhere.)
    """

    __name__ = "overlong_penalty"

    def __init__(self, *, max_new_tokens: int, overlong_buffer: int):
        if not 0 < overlong_buffer <= max_new_tokens:
            raise ValueError(
                "reward 'overlong_penalty': need 0 < overlong_buffer <= max_new_tokens, got "
                f"overlong_buffer={overlong_buffer}, max_new_tokens={max_new_tokens}"
            )
        self.max_new_tokens = max_new_tokens
        self.overlong_buffer = overlong_buffer

    def __call__(self, *, completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
        expected = self.max_new_tokens - self.overlong_buffer
        return [self._penalty(len(ids), expected) for ids in completion_ids]

    def _penalty(self, length: int, expected: int) -> float:
        if length <= expected:
            return 0.0
        if length <= self.max_new_tokens:
            return (expected - length) / self.overlong_buffer
        return -1.0
