"""Reward-model objectives, ensemble scoring, preference strength and pairwise accuracy.

Registered losses (`@reward_model_loss`) take the reward model's scalar outputs and return per-example
losses [N]; reduction is the caller's. `ensemble_score`, `preference_strength`, `pairwise_accuracy` and
`accuracy_by_bucket` are plain functions for scorers, margins and evaluation; they are not losses.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain.objectives.registry import reward_model_loss


@reward_model_loss("bradley_terry")
def bradley_terry(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    margin: Tensor | None = None,
    center_coef: float = 0.0,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Bradley-Terry pairwise reward-model loss (Ouyang et al. 2022, arXiv:2203.02155, Eq. 1), with the
    preference-strength margin of Llama 2 (Touvron et al. 2023, arXiv:2307.09288, Eq. 2) or the adaptive margin
    and the label smoothing of Secrets of RLHF II (Wang et al. 2024, arXiv:2401.06080, Sec. 3.2), and the
    reward-centering term of Eisenstein et al. 2023 (arXiv:2312.09244, Eq. 2).

        d    = r_c - r_r - m
        loss = -(1 - alpha) log sigmoid(d) - alpha log sigmoid(-d) + center_coef * (r_c + r_r)^2
        alpha = label_smoothing

    chosen_rewards, rejected_rewards: [N]; margin: [N] or None (m = 0): a `margin` column, or the mean preference
    strength of an ensemble of reward models (`preference_strength`; `rm.margin_models`). Returns [N].
    Deviations from the papers: none; with both, the smoothing is of the margin-shifted preference (the paper's
    "Soft Label + Margin" smooths only the pairs of negative strength; here alpha applies to every pair). TRL's
    RewardTrainer adds the same centering term (center_rewards_coefficient * mean((r_c + r_r)^2)); Eisenstein et
    al. suggest 0.01.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"reward-model loss 'bradley_terry': label_smoothing={label_smoothing}; it must be in "
                         "[0, 0.5) (0.5 would make every pair a tie)")  # fmt: skip
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-diff)
    if center_coef:
        loss = loss + center_coef * (chosen_rewards + rejected_rewards) ** 2
    return loss


@reward_model_loss("listwise_pl")
def listwise_pl(rewards_N_K: Tensor, scores_N_K: Tensor) -> Tensor:
    """Plackett-Luce listwise reward-model loss: the negative log-likelihood of the ranking given by
    the labels, with the rewards as PL logits (Plackett 1975; Luce 1959; as the ranking model of
    Rafailov et al. 2023, arXiv:2305.18290, Appendix A.3, and for K-wise reward models in
    Zhu et al. 2023, arXiv:2301.11270, Sec. 4).

        tau  = the K completions ranked by scores_N_K, best first (ties keep list order)
        loss = sum_{k=1..K} [ log sum_{j>=k} exp(r_tau(j)) - r_tau(k) ]

    rewards_N_K, scores_N_K: [N, K]; returns [N]. K=2 is `bradley_terry` without margin.
    Deviations from the papers: none.
    """
    order_N_K = torch.argsort(scores_N_K, dim=-1, descending=True, stable=True)
    ranked_N_K = torch.gather(rewards_N_K, -1, order_N_K)
    tail_lse_N_K = torch.flip(torch.logcumsumexp(torch.flip(ranked_N_K, [-1]), dim=-1), [-1])
    return (tail_lse_N_K - ranked_N_K).sum(dim=-1)


EnsembleMode = Literal["mean", "min", "mean_minus_std", "mean_minus_var"]


def ensemble_score(rewards_K_N: Tensor, *, mode: EnsembleMode = "mean", lam: float = 1.0) -> Tensor:
    """Combine K reward models' scores of N completions (Coste et al. 2023, arXiv:2310.02743).

        mean:            R = mean_k r_k
        min:             R = min_k r_k                              (worst-case optimisation, WCO)
        mean_minus_var:  R = mean_k r_k - lam * var_k r_k           (uncertainty-weighted, UWO, paper)
        mean_minus_std:  R = mean_k r_k - lam * std_k r_k

    var and std over the K members with 1/K (population), as in the paper. rewards_K_N: [K, N]; returns [N].
    Deviations from the paper: `mean_minus_std` is not in the paper (its UWO penalises the variance);
    it is offered because std is in reward units, so lam does not depend on the reward scale.
    """
    if mode == "mean":
        return rewards_K_N.mean(dim=0)
    if mode == "min":
        return rewards_K_N.min(dim=0).values
    if mode == "mean_minus_var":
        return rewards_K_N.mean(dim=0) - lam * rewards_K_N.var(dim=0, correction=0)
    if mode == "mean_minus_std":
        return rewards_K_N.mean(dim=0) - lam * rewards_K_N.std(dim=0, correction=0)
    raise ValueError(
        f"ensemble_score: mode={mode!r} is not known; use one of mean, min, mean_minus_std, mean_minus_var"
    )


def pairwise_accuracy(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """Fraction of pairs whose chosen reward is strictly higher than the rejected one (0-dim tensor).

    Ties count as wrong, as in TRL's RewardTrainer. chosen_rewards, rejected_rewards: [N].
    """
    return (chosen_rewards > rejected_rewards).float().mean()


def preference_strength(chosen_K_N: Tensor, rejected_K_N: Tensor) -> tuple[Tensor, Tensor]:
    """The preference strength of N pairs under an ensemble of K reward models (Wang et al. 2024, Secrets of RLHF
    II, arXiv:2401.06080, Sec. 2.1): the mean and the standard deviation over the models of d_k = r_k(chosen) -
    r_k(rejected).

        u = 1/K sum_k d_k,     sigma = sqrt(1/K sum_k (d_k - u)^2)

    A pair of negative mean strength is one the ensemble thinks mislabelled; the mean is the paper's adaptive margin.
    chosen_K_N, rejected_K_N: [K, N]. Returns (u [N], sigma [N]). Deviations from the paper: none.
    """
    d_K_N = chosen_K_N - rejected_K_N
    return d_K_N.mean(dim=0), d_K_N.std(dim=0, correction=0)


def accuracy_by_bucket(margins_N: Tensor, strengths_N: Tensor, edges: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise accuracy (margin r_c - r_r > 0, ties wrong) in buckets of a per-pair strength, with each bucket's
    pair count: bucket i holds edges[i - 1] <= strength < edges[i] (bucket 0: below edges[0]; the last: from
    edges[-1] on). margins_N, strengths_N: [N]; edges: [E] increasing. Returns (accuracy [E + 1], NaN for an empty
    bucket; counts [E + 1])."""
    bucket_N = torch.bucketize(strengths_N, edges, right=True)
    counts = torch.bincount(bucket_N, minlength=len(edges) + 1).float()
    right = torch.bincount(bucket_N, weights=(margins_N > 0).float(), minlength=len(edges) + 1)
    return torch.where(counts > 0, right / counts.clamp(min=1), float("nan")), counts
