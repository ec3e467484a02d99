"""Pairwise judges: probabilities that completion a is preferred to completion b."""

from __future__ import annotations

from posttrain.rewards.judges import closer_answer


def test_closer_answer_prefers_the_nearer_number_and_ties_equal_distances():
    verdicts = closer_answer(
        prompts=["7+5="] * 5,
        completions_a=["12", "13", "10", "14", "no idea"],
        completions_b=["15", "12", "14", "10", "20"],
        answer=["12"] * 5,
    )
    # |12-12| = 0 < 3; 1 > 0; |10-12| = |14-12| = 2 and 2 (tie); 2 = 2 (tie); no number loses to 8 away
    assert verdicts == [1.0, 0.0, 0.5, 0.5, 0.0]


def test_closer_answer_reads_answer_tags_and_conversations():
    verdicts = closer_answer(
        completions_a=["<answer>12</answer>"],
        completions_b=[[{"role": "assistant", "content": "it is 11"}]],
        answer=["12"],
    )
    assert verdicts == [1.0]
