"""format, length_penalty and overlong_penalty against hand-computed values."""

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from posttrain.rewards.format import FormatReward
from posttrain.rewards.length import OverlongPenalty, length_penalty


def test_format_default_is_r1_layout():
    completions = [
        "<think>a\nb</think>\n<answer>4</answer>",  # DOTALL: reasoning may span lines
        "<answer>4</answer>",  # no think block
        "<think>a</think><answer>4</answer> trailing",  # text after </answer>
        [{"role": "assistant", "content": "<think>x</think> <answer>y</answer>"}],
    ]
    assert FormatReward()(completions=completions) == [1.0, 0.0, 0.0, 1.0]
    # one think and one answer block, nothing inside them that is a tag, nothing after (open-r1's pattern passed
    # every one of these: audit); whitespace may end it
    hacks = [
        "<think>a</think><answer>b</answer><answer>c</answer>",
        "<think>a</think><answer>b</answer><think>c</think><answer>d</answer>",
        "<think><think>a</think></think><answer>b</answer>",
        "<think>a</think><answer><answer>b</answer></answer>",
    ]
    assert FormatReward()(completions=hacks) == [0.0] * len(hacks)
    assert FormatReward()(completions=["<think>a</think><answer>b</answer>\n"]) == [1.0]  # a final newline


def test_format_custom_pattern_and_bad_regex():
    reward = FormatReward(pattern=r"^\d+$", dotall=False)
    assert reward(completions=["123", "12a"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="not a valid regex"):
        FormatReward(pattern="(")


def test_length_penalty_is_linear_beyond_free_tokens():
    ids = [[0] * 3, [0] * 10, []]
    # -0.1 * max(0, L - 4): L=3 -> 0, L=10 -> -0.6, L=0 -> 0
    scores = length_penalty(completion_ids=ids, penalty_per_token=0.1, free_tokens=4)
    assert scores == pytest.approx([0.0, -0.6, 0.0])
    # defaults: -1e-3 per token
    assert length_penalty(completion_ids=[[0] * 200]) == pytest.approx([-0.2])


def test_overlong_penalty_matches_dapo_eq13_by_hand():
    # L_max = 32, L_cache = 8, so L_max - L_cache = 24.
    # |y| = 10 -> 0;  24 -> 0 (boundary);  25 -> (24 - 25)/8 = -0.125;  28 -> (24 - 28)/8 = -0.5;
    # 32 -> (24 - 32)/8 = -1 (boundary);  40 -> -1 (over L_max)
    reward = OverlongPenalty(max_new_tokens=32, overlong_buffer=8)
    ids = [[7] * n for n in (10, 24, 25, 28, 32, 40)]
    assert reward(completion_ids=ids) == pytest.approx([0.0, 0.0, -0.125, -0.5, -1.0, -1.0])


@pytest.mark.parametrize(("max_new_tokens", "overlong_buffer"), [(32, 0), (8, 9)])
def test_overlong_penalty_rejects_impossible_buffers(max_new_tokens, overlong_buffer):
    with pytest.raises(ValueError, match="0 < overlong_buffer <= max_new_tokens"):
        OverlongPenalty(max_new_tokens=max_new_tokens, overlong_buffer=overlong_buffer)


@given(
    max_new_tokens=st.integers(1, 64),
    buffer_fraction=st.floats(0.01, 1.0),
    lengths=st.lists(st.integers(0, 80), min_size=2, max_size=8),
)
def test_overlong_penalty_is_bounded_and_never_rewards_length(max_new_tokens, buffer_fraction, lengths):
    buffer = max(1, int(buffer_fraction * max_new_tokens))
    reward = OverlongPenalty(max_new_tokens=max_new_tokens, overlong_buffer=buffer)
    lengths = sorted(lengths)
    scores = reward(completion_ids=[[0] * n for n in lengths])
    assert all(-1.0 <= s <= 0.0 for s in scores)
    assert all(a >= b for a, b in itertools.pairwise(scores))  # longer never scores higher
    assert all(s == 0.0 for n, s in zip(lengths, scores) if n <= max_new_tokens - buffer)
