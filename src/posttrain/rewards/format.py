"""Format reward: does the completion follow the required output layout?"""

from __future__ import annotations

import re
from typing import Any

from posttrain.rewards.base import completion_text

_NO_TAG = r"(?:(?!</?(?:think|answer)>).)*"
R1_FORMAT = rf"^<think>{_NO_TAG}</think>\s*<answer>{_NO_TAG}</answer>\s*\Z"
r"""DeepSeek-R1's layout (Guo et al. 2025, arXiv:2501.12948): reasoning in one <think>, then one <answer>.
Deviation from open-r1's and TRL's `^<think>.*?</think>\s*<answer>.*?</answer>$`: neither block may hold another
tag (only whitespace may follow the answer), where their lazy `.*?` stretches to the end, so that a second answer,
nested or repeated blocks also scored 1.0 (a reward to hack)."""


class FormatReward:
    """1.0 when the completion matches `pattern` (`re.match`, so anchor the end with `$`), else 0.0.

    Args: `pattern` (default `R1_FORMAT`), `dotall` (default True, so `.` crosses lines as reasoning
    does). The pattern is compiled when the reward is built, so a bad regex fails at load time.
    """

    __name__ = "format"

    def __init__(self, *, pattern: str = R1_FORMAT, dotall: bool = True):
        try:
            self.regex = re.compile(pattern, re.DOTALL if dotall else 0)
        except re.error as err:
            raise ValueError(f"reward 'format': pattern {pattern!r} is not a valid regex: {err}") from err

    def __call__(self, *, completions: list[Any], **kwargs: Any) -> list[float]:
        return [float(self.regex.match(completion_text(c)) is not None) for c in completions]
