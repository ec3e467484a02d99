"""Reward-model objectives, ensemble scoring and pairwise accuracy.

Registered losses (`@reward_model_loss`) take the reward model's scalar outputs and return per-example
losses [N]; reduction is the caller's. `ensemble_score` and `pairwise_accuracy` are plain functions for
scorers and evaluation; they are not losses.
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
) -> Tensor:
    """Bradley-Terry pairwise reward-model loss (Ouyang et al. 2022, arXiv:2203.02155, Eq. 1), with the
    preference-strength margin of Llama 2 (Touvron et al. 2023, arXiv:2307.09288, Eq. 2) and the
    reward-centering term of Eisenstein et al. 2023 (arXiv:2312.09244, Eq. 2).

        loss = -log sigmoid(r_c - r_r - m) + center_coef * (r_c + r_r)^2

    chosen_rewards, rejected_rewards: [N]; margin: [N] or None (m = 0). Returns [N].
    Deviations from the papers: none. TRL's RewardTrainer adds the same centering term
    (center_rewards_coefficient * mean((r_c + r_r)^2)); Eisenstein et al. suggest 0.01.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
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
