"""OTC's tool-efficiency reward on episodes' messages."""

import math

import pytest

from posttrain.rewards import load_reward_fn
from posttrain.rewards.tool_use import count_tool_calls, tool_efficiency


def episode(calls: int, answer: str) -> list[dict]:
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "2*3"}}}
    turns = [m for _ in range(calls) for m in ({"role": "assistant", "content": "", "tool_calls": [call]},
                                                {"role": "tool", "content": "6"})]  # fmt: skip
    return [*turns, {"role": "assistant", "content": answer}]


def test_right_answers_with_fewer_calls_score_more():
    completions = [episode(0, "6"), episode(1, "6"), episode(2, "6"), episode(1, "7"), "6"]
    scores = tool_efficiency(completions=completions, answer=["6"] * 5)
    # m = 0: cos 0 = 1; m = 1: cos(pi / 3) = 0.5; m = 2: cos(2 pi / 5) = 0.309017; wrong: 0; text, no calls: 1
    assert scores == pytest.approx([1.0, 0.5, math.cos(2 * math.pi / 5), 0.0, 1.0])
    assert [count_tool_calls(c) for c in completions] == [0, 1, 2, 1, 0]
    # a larger c decays slower: m = 1, c = 4 -> cos(pi / 6) = 0.866025, times alpha 2
    assert tool_efficiency(completions=[episode(1, "6")], answer=["6"], alpha=2.0, c=4.0) == pytest.approx(
        [2 * math.cos(math.pi / 6)])
    assert load_reward_fn("tool_efficiency")(completions=[episode(0, "6")], answer=[None]) == [None]
