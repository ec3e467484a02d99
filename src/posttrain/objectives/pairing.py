"""From the scores of sampled completions to training examples: preference matrices, win rates, pairs
and labels. Pure functions of tensors; the online preference loop (`trainers/online_preference.py`)
calls them on each round's samples, and nothing here knows where the scores came from.

Axes: P prompts, K completions per prompt, M opponents per prompt. A selection of pairs is a LongTensor
`pairs_M_3` of rows (prompt, chosen, rejected), indices into [P] and [K]; labels for unpaired losses are
an int tensor [P, K] with 1 = desirable, 0 = undesirable, -1 = left out.
"""

from __future__ import annotations

import math

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


def statistical_rejection_sample(
    rewards: list[float], *, beta: float, num_accepted: int, generator: torch.Generator | None = None
) -> list[int]:
    """RSO's statistical rejection sampling (Liu et al. 2023, arXiv:2309.06657, Algorithm 1): from K candidates sampled
    from a policy pi, with their rewards, the indices of `num_accepted` of them as samples of the optimal policy
    pi*(y|x) ~ pi(y|x) exp(r(y) / beta).

        repeat until num_accepted are accepted (or every candidate is):
            r_max = the highest reward among the candidates left
            for each candidate left, in order: accept it when u < exp((r - r_max) / beta),  u ~ U[0, 1);
                                               stop the pass once num_accepted are accepted

    A pass always accepts the best candidate left (exp(0) = 1 > u), so it ends. Returns indices in acceptance order.
    Deviations: none (the paper's listing, one uniform draw per candidate per pass).
    """
    if beta <= 0:
        raise ValueError(f"statistical rejection sampling: beta={beta} must be > 0")
    left, accepted = list(range(len(rewards))), []
    wanted = min(num_accepted, len(rewards))
    while len(accepted) < wanted:
        r_max = max(rewards[i] for i in left)
        taken = []
        for i in left:
            if torch.rand((), generator=generator).item() >= math.exp((rewards[i] - r_max) / beta):
                continue
            taken.append(i)
            if len(accepted) + len(taken) == wanted:
                break
        accepted += taken
        left = [i for i in left if i not in taken]
    return accepted


def statistical_rejection_pairs(
    scores_P_K: Tensor, *, beta: float, num_accepted: int, generator: torch.Generator | None = None
) -> Tensor:
    """RSO's pairs (Liu et al. 2023, arXiv:2309.06657): each prompt's candidates rejection-sampled
    (`statistical_rejection_sample`), the accepted ones shuffled and paired (1st, 2nd), (3rd, 4th), ..., each pair
    labelled by its rewards (the higher chosen); a pair of equal rewards carries no preference and is left out.
    scores_P_K: [P, K]. Returns pairs_M_3 (prompt, chosen, rejected)."""
    pairs = []
    for p, row in enumerate(scores_P_K.tolist()):
        accepted = statistical_rejection_sample(row, beta=beta, num_accepted=num_accepted, generator=generator)
        shuffled = [accepted[i] for i in torch.randperm(len(accepted), generator=generator).tolist()]
        for a, b in zip(shuffled[0::2], shuffled[1::2], strict=False):
            if row[a] != row[b]:
                pairs.append((p, a, b) if row[a] > row[b] else (p, b, a))
    return torch.tensor(pairs, dtype=torch.long).view(-1, 3)
