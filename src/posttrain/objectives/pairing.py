"""From the scores of sampled completions to training examples: preference matrices, win rates, pairs
and labels. Pure functions of tensors; the online preference loop (`trainers/online_preference.py`)
calls them on each round's samples, and nothing here knows where the scores came from.

Axes: P prompts, K completions per prompt, M opponents per prompt. A selection of pairs is a LongTensor
`pairs_M_3` of rows (prompt, chosen, rejected), indices into [P] and [K]; labels for unpaired losses are
an int tensor [P, K] with 1 = desirable, 0 = undesirable, -1 = left out.
"""

from __future__ import annotations

import torch
from torch import Tensor


def preference_matrix(scores_P_K: Tensor, opponent_scores_P_M: Tensor | None = None) -> Tensor:
    """P(y_i beats o_j) read off scalar scores as a hard preference (a verifier's 1/0 or a reward model's
    scores compared directly):

        pref[p, i, j] = 1 if s_i > s_j,  1/2 if s_i = s_j,  0 if s_i < s_j

    Opponents o_j are the group's own completions (returns [P, K, K]) or `opponent_scores_P_M` ([P, M]).
    """
    other_P_M = scores_P_K if opponent_scores_P_M is None else opponent_scores_P_M
    diff_P_K_M = scores_P_K[:, :, None] - other_P_M[:, None, :]
    return (diff_P_K_M > 0).float() + 0.5 * (diff_P_K_M == 0).float()


def win_rates_within_group(prefs_P_K_K: Tensor) -> Tensor:
    """Each completion's estimated probability of beating another sample of the same policy
    (SPPO's P(y > pi_t | x), Wu et al. 2024, arXiv:2405.00675, Sec. 4):

        w_i = 1/(K-1) * sum_{j != i} pref[i, j]

    prefs_P_K_K: [P, K, K]; K >= 2. Returns [P, K] in [0, 1].
    """
    k = prefs_P_K_K.shape[-1]
    if k < 2:
        raise ValueError(f"win_rates_within_group: a group of {k} completion has no other sample to beat")
    diagonal_P_K = torch.diagonal(prefs_P_K_K, dim1=-2, dim2=-1)
    return (prefs_P_K_K.sum(dim=-1) - diagonal_P_K) / (k - 1)


def win_rates_against(prefs_P_K_M: Tensor) -> Tensor:
    """Each completion's mean probability of beating the prompt's M opponents (samples of another
    policy: Nash-MD's mixture). prefs_P_K_M: [P, K, M]. Returns [P, K]."""
    return prefs_P_K_M.mean(dim=-1)


def best_vs_worst(scores_P_K: Tensor, *, margin: float = 0.0) -> Tensor:
    """One pair per prompt: the best-scored completion against the worst (Xiong et al. 2023,
    arXiv:2312.11456; Rosset et al. 2024, arXiv:2404.03715, Sec. 5), kept when best - worst > margin.
    Ties go to the lowest index. scores_P_K: [P, K]. Returns pairs_M_3 (prompt, chosen, rejected)."""
    best_P, worst_P = scores_P_K.argmax(dim=1), scores_P_K.argmin(dim=1)
    gap_P = scores_P_K.max(dim=1).values - scores_P_K.min(dim=1).values
    keep_P = gap_P > margin
    prompts_M = torch.arange(scores_P_K.shape[0])[keep_P]
    return torch.stack((prompts_M, best_P[keep_P], worst_P[keep_P]), dim=1)


def all_pairs_above_margin(scores_P_K: Tensor, *, margin: float = 0.0) -> Tensor:
    """Every ordered pair of a prompt's completions whose scores differ by more than `margin`:
    (p, i, j) with s_i - s_j > margin, in (p, i, j) order. scores_P_K: [P, K]. Returns pairs_M_3."""
    above_P_K_K = (scores_P_K[:, :, None] - scores_P_K[:, None, :]) > margin
    return above_P_K_K.nonzero()


def top_k_labels(scores_P_K: Tensor, *, k: int, min_score: float | None = None) -> Tensor:
    """RAFT's selection (Dong et al. 2023, arXiv:2304.06767, Alg. 1): each prompt's k best completions
    are desirable (1), the rest left out (-1); with `min_score`, a selected completion below it is left
    out too (rejection sampling keeps only accepted samples). Ties keep list order.
    scores_P_K: [P, K]. Returns labels [P, K] (int64)."""
    order_P_K = torch.sort(scores_P_K, dim=1, descending=True, stable=True).indices
    positions_P_K = torch.arange(scores_P_K.shape[1]).expand_as(order_P_K)
    rank_P_K = torch.empty_like(order_P_K).scatter_(1, order_P_K, positions_P_K)
    selected_P_K = rank_P_K < k
    if min_score is not None:
        selected_P_K &= scores_P_K >= min_score
    return torch.where(selected_P_K, 1, -1)


def threshold_labels(scores_P_K: Tensor, *, threshold: float) -> Tensor:
    """Unpaired labels (KTO, BCO): desirable (1) when the score reaches `threshold`, else undesirable (0).
    scores_P_K: [P, K]. Returns labels [P, K] (int64)."""
    return (scores_P_K >= threshold).long()
