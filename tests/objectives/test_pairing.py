"""Pair building and selection from a [P, K] score matrix, against hand-worked cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from posttrain.objectives.pairing import (
    all_pairs_above_margin,
    best_vs_worst,
    preference_matrix,
    threshold_labels,
    top_k_labels,
    win_rates_against,
    win_rates_within_group,
)


def t(values) -> Tensor:
    return torch.tensor(values, dtype=torch.float32)


def rows(pairs_M_3: Tensor) -> list[tuple[int, int, int]]:
    return [tuple(r) for r in pairs_M_3.tolist()]


def test_preference_matrix_is_a_hard_comparison_with_half_for_ties():
    # scores 2, 1, 1: row 0 beats both (1, 1) and ties itself (1/2); rows 1 and 2 tie each other
    prefs = preference_matrix(t([[2.0, 1.0, 1.0]]))
    torch.testing.assert_close(prefs, t([[[0.5, 1.0, 1.0], [0.0, 0.5, 0.5], [0.0, 0.5, 0.5]]]))
    # against one opponent scored 1.5: only the first completion wins
    torch.testing.assert_close(preference_matrix(t([[2.0, 1.0, 1.0]]), t([[1.5]])), t([[[1.0], [0.0], [0.0]]]))


def test_win_rates_leave_the_sample_itself_out():
    # row 0: (0.5 + 1 + 1 - 0.5) / 2 = 1; rows 1, 2: (0 + 0.5 + 0.5 - 0.5) / 2 = 0.25
    prefs = preference_matrix(t([[2.0, 1.0, 1.0]]))
    torch.testing.assert_close(win_rates_within_group(prefs), t([[1.0, 0.25, 0.25]]))
    # a group of equal scores: every sample wins half of its games
    torch.testing.assert_close(win_rates_within_group(preference_matrix(t([[3.0, 3.0]]))), t([[0.5, 0.5]]))
    with pytest.raises(ValueError, match="no other sample"):
        win_rates_within_group(preference_matrix(t([[1.0]])))


def test_win_rates_against_opponents_average_over_them():
    # completion scored 1 against opponents 0, 1, 2: wins 1, 1/2, 0 -> 1/2
    torch.testing.assert_close(win_rates_against(preference_matrix(t([[1.0]]), t([[0.0, 1.0, 2.0]]))), t([[0.5]]))


def test_best_vs_worst_skips_ties_and_small_margins():
    scores = t([[0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 2.0, 1.0]])
    # prompt 0: first best is 1, first worst is 0; prompt 1 has no preference; prompt 2: 0 over 1
    assert rows(best_vs_worst(scores)) == [(0, 1, 0), (2, 0, 1)]
    # margin 2.5: only prompt 2's gap of 3 is larger
    assert rows(best_vs_worst(scores, margin=2.5)) == [(2, 0, 1)]
    assert best_vs_worst(t([[1.0, 1.0]])).shape == (0, 3)


def test_all_pairs_above_margin():
    scores = t([[0.0, 1.0, 0.0], [2.0, 0.0, 1.0]])
    # prompt 0: 1 beats 0 and 2; prompt 1: 0 > 1 (2 > 0), 0 > 2 (2 > 1), 2 > 1 (1 > 0)
    assert rows(all_pairs_above_margin(scores)) == [(0, 1, 0), (0, 1, 2), (1, 0, 1), (1, 0, 2), (1, 2, 1)]
    # margin 1: only differences above 1 -> 2 - 0 of prompt 1
    assert rows(all_pairs_above_margin(scores, margin=1.0)) == [(1, 0, 1)]


def test_top_k_labels_keep_the_best_and_drop_rejected_samples():
    scores = t([[0.0, 1.0, 1.0, 0.5]])
    # descending, stable: 1 (1.0), 2 (1.0), 3 (0.5), 0 (0.0) -> top 2 are 1 and 2
    assert top_k_labels(scores, k=2).tolist() == [[-1, 1, 1, -1]]
    # top 1 that also reaches min_score 1: only completion 1
    assert top_k_labels(scores, k=1, min_score=1.0).tolist() == [[-1, 1, -1, -1]]
    # no sample reaches min_score: nothing is trained on
    assert top_k_labels(t([[0.0, 0.5]]), k=1, min_score=1.0).tolist() == [[-1, -1]]


def test_threshold_labels():
    assert threshold_labels(t([[1.0, 0.0, 0.5]]), threshold=1.0).tolist() == [[1, 0, 0]]
    assert threshold_labels(t([[1.0, 0.0, 0.5]]), threshold=0.5).tolist() == [[1, 0, 1]]


def test_statistical_rejection_sampling_accepts_with_probability_exp_of_the_reward_gap():
    from posttrain.objectives.pairing import statistical_rejection_sample

    # candidates in order [r = 0, r = 1], beta 1, one to accept: the first pass meets r = 0 first and accepts it with
    # probability exp((0 - 1) / 1) = e^-1 = 0.367879, else it accepts r = 1 (exp(0) = 1 > u always)
    g = torch.Generator().manual_seed(0)
    draws = [statistical_rejection_sample([0.0, 1.0], beta=1.0, num_accepted=1, generator=g) for _ in range(20000)]
    share_first = sum(d == [0] for d in draws) / len(draws)
    assert abs(share_first - math.exp(-1)) < 0.01  # 3.4 standard errors of 20,000 draws
    # the best candidate is always accepted first if it leads; a tiny beta keeps only the best of what is left
    assert statistical_rejection_sample([1.0, 0.0], beta=1.0, num_accepted=1, generator=g) == [0]
    assert statistical_rejection_sample([0.2, 0.9, 0.5], beta=1e-9, num_accepted=3, generator=g) == [1, 2, 0]
    # a huge beta accepts everything in the first pass, in order; asking for more than K gives all K
    assert statistical_rejection_sample([0.0, 5.0, 1.0], beta=1e9, num_accepted=5, generator=g) == [0, 1, 2]


def test_statistical_rejection_pairs_orient_by_reward_and_drop_ties():
    from posttrain.objectives.pairing import statistical_rejection_pairs

    g = torch.Generator().manual_seed(1)
    # beta 1e9 accepts all four; two pairs per prompt after the shuffle; prompt 1's candidates all tie -> no pair
    scores_P_K = torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0]])
    pairs = statistical_rejection_pairs(scores_P_K, beta=1e9, num_accepted=4, generator=g)
    assert pairs.shape == (2, 3) and (pairs[:, 0] == 0).all()
    chosen, rejected = scores_P_K[0, pairs[:, 1]], scores_P_K[0, pairs[:, 2]]
    assert (chosen > rejected).all()
    assert sorted(pairs[:, 1:].flatten().tolist()) == [0, 1, 2, 3]  # each accepted sample in one pair
    with pytest.raises(ValueError, match="beta=0"):
        statistical_rejection_pairs(scores_P_K, beta=0.0, num_accepted=2)
