"""Reward-model losses, ensemble scoring and pairwise accuracy against hand-computed values.

sp(x) = -log sigmoid(x) = log(1 + e^-x); sp(0) = log 2 = 0.693147, sp(1) = 0.313262, sp(0.5) = 0.474077.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain.objectives import preference
from posttrain.objectives.registry import REWARD_MODEL_LOSSES
from posttrain.objectives.reward_model import (
    accuracy_by_bucket,
    bradley_terry,
    ensemble_score,
    listwise_pl,
    pairwise_accuracy,
    preference_strength,
)


def t(values) -> Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(actual: Tensor, expected, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, t(expected), atol=atol, rtol=0)


def test_registered_with_needs():
    # bradley_terry's optional margin is supplied when the rows have a margin column
    assert REWARD_MODEL_LOSSES["bradley_terry"] is bradley_terry and bradley_terry.needs == ("margin",)
    assert REWARD_MODEL_LOSSES["listwise_pl"] is listwise_pl and listwise_pl.needs == ("listwise",)


def test_bradley_terry_matches_hand_computed_values():
    # r_c = [1, 0], r_r = [0, 0]: sp(1) = 0.313262, sp(0) = 0.693147
    close(bradley_terry(t([1.0, 0.0]), t([0.0, 0.0])), [0.313262, 0.693147])


def test_bradley_terry_margin_and_centering():
    # margin [0.5, -1], center 0.1
    # pair 0: sp(1 - 0 - 0.5) = sp(0.5) = 0.474077, + 0.1 * (1 + 0)^2 = 0.1 -> 0.574077
    # pair 1: sp(0 - 0 + 1) = sp(1) = 0.313262,     + 0.1 * 0^2            -> 0.313262
    loss = bradley_terry(t([1.0, 0.0]), t([0.0, 0.0]), margin=t([0.5, -1.0]), center_coef=0.1)
    close(loss, [0.574077, 0.313262])


def test_bradley_terry_extreme_differences_are_finite():
    # r_c - r_r = +-100: sp(100) ~ 0, sp(-100) = 100
    chosen = t([50.0, -50.0]).requires_grad_()
    loss = bradley_terry(chosen, t([-50.0, 50.0]))
    loss.sum().backward()
    close(loss, [0.0, 100.0])
    assert torch.isfinite(chosen.grad).all()


def test_bradley_terry_gradient_direction():
    chosen, rejected = t([0.3]).requires_grad_(), t([0.1]).requires_grad_()
    bradley_terry(chosen, rejected).sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()


def test_bradley_terry_matches_trl_reward_trainer():
    # trl/trainer/reward_trainer.py: -logsigmoid(r_c - r_r - margin).mean() + coef * mean((r_c + r_r)^2)
    g = torch.Generator().manual_seed(0)
    rewards_chosen, rewards_rejected, margin = (torch.randn(8, generator=g) for _ in range(3))
    coef = 0.01
    trl = -F.logsigmoid(rewards_chosen - rewards_rejected - margin).mean()
    trl = trl + coef * torch.mean((rewards_chosen + rewards_rejected) ** 2)
    ours = bradley_terry(rewards_chosen, rewards_rejected, margin=margin, center_coef=coef).mean()
    torch.testing.assert_close(ours, trl)


def test_listwise_pl_matches_hand_computed_values():
    # rewards [0, 1, 2], labels [3, 1, 2] -> ranking item 0, item 2, item 1 -> rewards ranked [0, 2, 1]
    # log(1 + e^2 + e) - 0 = 2.407606; log(e^2 + e) - 2 = 0.313262; last step 0 -> 2.720868
    close(listwise_pl(t([[0.0, 1.0, 2.0]]), t([[3.0, 1.0, 2.0]])), [2.720868])


def test_listwise_pl_with_two_completions_is_bradley_terry():
    # K = 2, rewards [1, 0], better first: sp(1) = 0.313262; swapped labels: sp(-1) = 1.313262
    close(listwise_pl(t([[1.0, 0.0], [1.0, 0.0]]), t([[1.0, 0.0], [0.0, 1.0]])), [0.313262, 1.313262])


def test_listwise_pl_equals_the_preference_plackett_luce_nll():
    # the same ranking model is written in preference.py (objectives import only the registry)
    g = torch.Generator().manual_seed(1)
    rewards, scores = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    torch.testing.assert_close(listwise_pl(rewards, scores), preference._plackett_luce_nll(rewards, scores))


def test_listwise_pl_gradient_raises_best_and_lowers_worst():
    rewards = t([[0.0, 0.0, 0.0]]).requires_grad_()
    listwise_pl(rewards, t([[2.0, 1.0, 0.0]])).sum().backward()
    assert rewards.grad[0, 0] < 0 < rewards.grad[0, 2]


REWARDS_K_N = t([[1.0, 4.0], [3.0, 0.0], [2.0, 2.0]])  # K = 3 models, N = 2 completions


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("mean", [2.0, 2.0]),  # (1 + 3 + 2)/3, (4 + 0 + 2)/3
        ("min", [1.0, 0.0]),
        # variances with 1/K: (1 + 1 + 0)/3 = 2/3, (4 + 4 + 0)/3 = 8/3; lam 0.5 -> 2 - 1/3, 2 - 4/3
        ("mean_minus_var", [5 / 3, 2 / 3]),
        # std sqrt(2/3) = 0.816497, sqrt(8/3) = 1.632993 -> 2 - 0.408248, 2 - 0.816497
        ("mean_minus_std", [1.591752, 1.183503]),
    ],
)
def test_ensemble_score(mode, expected):
    close(ensemble_score(REWARDS_K_N, mode=mode, lam=0.5), expected)


def test_ensemble_score_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mean_minus_std"):
        ensemble_score(REWARDS_K_N, mode="median")  # type: ignore[arg-type]


def test_pairwise_accuracy_counts_ties_as_wrong():
    # 1 > 0 yes, 0 > 0 no (tie), 2 > 3 no, 3 > 1 yes -> 2/4
    acc = pairwise_accuracy(t([1.0, 0.0, 2.0, 3.0]), t([0.0, 0.0, 3.0, 1.0]))
    assert acc.item() == pytest.approx(0.5)
    assert acc.dim() == 0
    assert math.isfinite(acc.item())


def test_bradley_terry_label_smoothing_mixes_in_the_flipped_preference():
    # d = 1, alpha 0.1: 0.9 * sp(1) + 0.1 * sp(-1) = 0.9 * 0.313262 + 0.1 * 1.313262 = 0.413262
    # with margin 1: d = 0 -> 0.9 * log 2 + 0.1 * log 2 = 0.693147
    close(bradley_terry(t([1.0]), t([0.0]), label_smoothing=0.1), [0.413262])
    close(bradley_terry(t([1.0]), t([0.0]), margin=t([1.0]), label_smoothing=0.1), [0.693147])


def test_bradley_terry_label_smoothing_bounds_the_gradient_of_a_confident_pair():
    # smoothed, the loss has its minimum at a finite margin (sigmoid(d) = 1 - alpha): a pair far past it is pushed back
    chosen = t([10.0]).requires_grad_()
    bradley_terry(chosen, t([0.0]), label_smoothing=0.1).sum().backward()
    assert chosen.grad.item() > 0  # d/d r_c = -(1 - alpha) sigmoid(-d) + alpha sigmoid(d) ~ 0.1 > 0 at d = 10


def test_bradley_terry_refuses_label_smoothing_of_a_half_or_more():
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        bradley_terry(t([1.0]), t([0.0]), label_smoothing=0.5)


def test_preference_strength_is_the_ensembles_mean_and_population_std():
    # d = chosen - rejected: model 0 [1, 2], model 1 [2, -1] -> mean [1.5, 0.5], std [0.5, 1.5]
    mean, std = preference_strength(t([[1.0, 2.0], [3.0, 0.0]]), t([[0.0, 0.0], [1.0, 1.0]]))
    close(mean, [1.5, 0.5])
    close(std, [0.5, 1.5])


def test_accuracy_by_bucket_counts_each_strength_range():
    # strengths [0, 0.5, 1, 2, 5], edges [0.5, 2]: buckets {0}, {0.5, 1}, {2, 5}; margins [1, -1, 2, 3, -2]
    # -> accuracy [1/1, 1/2, 1/2], counts [1, 2, 2]; a bucket without pairs is NaN
    accuracy, counts = accuracy_by_bucket(t([1.0, -1.0, 2.0, 3.0, -2.0]), t([0.0, 0.5, 1.0, 2.0, 5.0]), t([0.5, 2.0]))
    close(accuracy, [1.0, 0.5, 0.5])
    close(counts, [1.0, 2.0, 2.0])
    accuracy, counts = accuracy_by_bucket(t([1.0]), t([0.0]), t([0.5]))
    assert counts.tolist() == [1.0, 0.0] and math.isnan(accuracy[1].item())
