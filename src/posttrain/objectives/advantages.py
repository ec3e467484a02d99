"""Advantage estimators: how a step's rewards become a weight per completion or per token.

Each estimator is registered with `@advantage(name, needs=...)`. The training loop calls it with the
inputs its signature names (see `posttrain.objectives.registry.ADVANTAGES` for what each need
supplies) plus the recipe's `rl.advantage_args` as keyword arguments. It is called once per step on
the whole step's batch, so group and batch statistics never depend on micro-batching.

An estimator returns either [P*G] (one advantage per completion; the loop broadcasts it over that
completion's tokens) or [B, T] (one per token, zero outside `mask_B_T`). Advantages carry no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.objectives.registry import advantage

_VAR_FLOOR = 1e-8  # OpenRLHF's floor on the variance before rsqrt: a batch of equal returns gives 0, not NaN


def _require_groups(name: str, group_size: int, minimum: int) -> None:
    if group_size < minimum:
        raise ValueError(f"advantage '{name}': group_size={group_size}; it needs at least {minimum}")


def _normalise_over_tokens(x_B_T: Tensor, mask_B_T: Tensor, *, scale_std: bool) -> Tensor:
    """(x - mean) / std over the valid tokens of the whole batch; zero outside the mask.

    mean and the biased variance (divide by N) are taken over all N valid tokens; the variance is
    floored at 1e-8 before the square root, as in OpenRLHF's REINFORCE++ (arXiv:2501.03262).
    """
    valid_B_T = mask_B_T.to(x_B_T.dtype)
    count = valid_B_T.sum().clamp(min=1.0)
    mean = (x_B_T * valid_B_T).sum() / count
    centred_B_T = (x_B_T - mean) * valid_B_T
    if not scale_std:
        return centred_B_T
    var = centred_B_T.square().sum() / count
    return centred_B_T * var.clamp(min=_VAR_FLOOR).rsqrt()


def _discounted_returns(token_rewards_B_T: Tensor, mask_B_T: Tensor, *, gamma: float) -> Tensor:
    """G_t = sum_{s >= t, s valid} gamma^(number of valid tokens strictly between t and s) * r_s.

    Invalid positions are skipped (their reward is ignored and they do not count as a step), so a mask
    with holes (tool output inside a multi-turn completion) chains the valid tokens around the hole.
    Returns [B, T], zero outside the mask.
    """
    rewards_B_T = token_rewards_B_T.detach()
    running_B = torch.zeros_like(rewards_B_T[:, 0])
    returns_T = []
    for t in reversed(range(rewards_B_T.shape[1])):
        valid_B = mask_B_T[:, t]
        running_B = torch.where(valid_B, rewards_B_T[:, t] + gamma * running_B, running_B)
        returns_T.append(torch.where(valid_B, running_B, torch.zeros_like(running_B)))
    return torch.stack(returns_T[::-1], dim=1)


@advantage("gae")
def gae(
    token_rewards_B_T: Tensor,
    values_B_T: Tensor,
    mask_B_T: Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
) -> Tensor:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438), as used by PPO.

        delta_t = r_t + gamma * V_{t+1} - V_t            (V after the last completion token = 0)
        A_t     = delta_t + gamma * lam * A_{t+1}
        whiten:   A <- (A - mean(A)) / std(A)            over all valid tokens of the step

    Value targets are the lambda-returns `advantages + values` computed *before* whitening; the loop
    computes them (this function returns only the advantages).

    token_rewards_B_T: [B, T] reward at the last completion token minus any per-token KL penalty.
    values_B_T: [B, T] critic values at completion positions. mask_B_T: [B, T] bool completion mask.
    Returns [B, T], zero outside the mask, detached.

    Defaults: gamma=1.0 (an episode is one completion; no discount, as in Ziegler et al. 2019,
    arXiv:1909.08593, and OpenRLHF); lam=0.95 (Ziegler et al. 2019 and OpenRLHF; also PPO's Atari and
    MuJoCo value, arXiv:1707.06347). whiten=True as in OpenRLHF and verl.

    Deviations: positions outside the mask are skipped rather than treated as zero-value steps, so a mask
    with holes bootstraps from the next valid token's value (verl's multi-turn GAE does the same). The
    whitening std is the biased one (divide by N) with a 1e-8 variance floor (OpenRLHF); verl uses the
    unbiased one, a difference of a factor sqrt(N / (N - 1)).
    """
    rewards_B_T, values_B_T = token_rewards_B_T.detach(), values_B_T.detach()
    next_value_B = torch.zeros_like(values_B_T[:, 0])
    running_B = torch.zeros_like(values_B_T[:, 0])
    advantages_T = []
    for t in reversed(range(rewards_B_T.shape[1])):
        valid_B = mask_B_T[:, t]
        delta_B = rewards_B_T[:, t] + gamma * next_value_B - values_B_T[:, t]
        running_B = torch.where(valid_B, delta_B + gamma * lam * running_B, running_B)
        next_value_B = torch.where(valid_B, values_B_T[:, t], next_value_B)
        advantages_T.append(torch.where(valid_B, running_B, torch.zeros_like(running_B)))
    advantages_B_T = torch.stack(advantages_T[::-1], dim=1)
    if whiten:
        return _normalise_over_tokens(advantages_B_T, mask_B_T, scale_std=True)
    return advantages_B_T


@advantage("grpo")
def grpo(rewards_PG: Tensor, *, group_size: int, scale_std: bool = True, eps: float = 1e-4) -> Tensor:
    """Group relative advantage (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, Sec. 4.1.2).

        A_i = (r_i - mean_j r_j) / (std_j r_j + eps)     over the G completions of one prompt
        scale_std=False:  A_i = r_i - mean_j r_j         (Dr. GRPO, Liu et al. 2025, arXiv:2503.20783)

    std is the unbiased sample std (divide by G - 1), as TRL (`nanstd`, Bessel-corrected) and verl
    (`torch.std`) compute it. A group with equal rewards gives zeros (0 / eps, hence eps > 0), never NaN.

    rewards_PG: [P*G], each prompt's G completions contiguous. Returns [P*G].

    Deviations: the paper has no eps; eps=1e-4 is TRL's value (verl uses 1e-6), kept so that our runs
    compare with TRL's. Group statistics are taken in float64, so that a group of equal rewards that
    float32 cannot average exactly (5 x 999.123) still centres to 0 instead of rounding noise / eps.
    """
    _require_groups("grpo", group_size, 2)
    if scale_std and eps <= 0:
        raise ValueError(f"advantage 'grpo': eps={eps}; it must be > 0 so that equal-reward groups give 0")
    r_P_G = rewards_PG.detach().view(-1, group_size).double()  # float64: equal rewards centre to exactly 0
    centred_P_G = r_P_G - r_P_G.mean(dim=1, keepdim=True)
    if scale_std:
        centred_P_G = centred_P_G / (r_P_G.std(dim=1, keepdim=True) + eps)
    return centred_P_G.flatten().to(rewards_PG.dtype)


@advantage("rloo")
def rloo(rewards_PG: Tensor, *, group_size: int) -> Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, arXiv:2402.14740).

        A_i = r_i - 1/(G-1) * sum_{j != i} r_j      over the G completions of one prompt

    rewards_PG: [P*G], each prompt's G completions contiguous. Returns [P*G].
    Deviations: none.
    """
    _require_groups("rloo", group_size, 2)
    r_P_G = rewards_PG.detach().view(-1, group_size)
    baseline_P_G = (r_P_G.sum(dim=1, keepdim=True) - r_P_G) / (group_size - 1)
    return (r_P_G - baseline_P_G).flatten()


@advantage("remax")
def remax(rewards_PG: Tensor, greedy_rewards_P: Tensor, *, group_size: int) -> Tensor:
    """ReMax: REINFORCE with the greedy completion's reward as baseline (Li et al. 2023, arXiv:2310.10505).

        A_i = r_i - r(greedy completion of the same prompt)

    rewards_PG: [P*G], each prompt's G completions contiguous; greedy_rewards_P: [P]. Returns [P*G].
    Deviations: the paper samples one completion per prompt (G = 1); with G > 1 every completion of a
    prompt shares that prompt's greedy baseline.
    """
    _require_groups("remax", group_size, 1)
    r_P_G = rewards_PG.detach().view(-1, group_size)
    return (r_P_G - greedy_rewards_P.detach().view(-1, 1)).flatten()


@advantage("reinforce_pp")
def reinforce_pp(
    token_rewards_B_T: Tensor, mask_B_T: Tensor, *, gamma: float = 1.0, scale_std: bool = True
) -> Tensor:
    """REINFORCE++ (Hu 2025, arXiv:2501.03262): discounted return, normalised over the whole batch.

        G_t = sum_{s >= t} gamma^(s - t) * r_s          r_s: token reward (outcome at the last token - KL_s)
        A_t = (G_t - mean(G)) / std(G)                  mean, std over every valid token of the step

    token_rewards_B_T: [B, T]; mask_B_T: [B, T] bool completion mask. Returns [B, T], zero outside the mask.
    std is the biased one (divide by N) with a 1e-8 variance floor, as in OpenRLHF (the paper's reference
    implementation). gamma=1.0 as in the paper and OpenRLHF. scale_std=False only centres (OpenRLHF's
    `--no_advantage_std_norm`).
    Deviations: none.
    """
    returns_B_T = _discounted_returns(token_rewards_B_T, mask_B_T, gamma=gamma)
    return _normalise_over_tokens(returns_B_T, mask_B_T, scale_std=scale_std)


@advantage("reinforce_pp_baseline")
def reinforce_pp_baseline(
    rewards_PG: Tensor,
    token_rewards_B_T: Tensor,
    mask_B_T: Tensor,
    *,
    group_size: int,
    scale_std: bool = True,
) -> Tensor:
    """REINFORCE++-baseline (Hu 2025, arXiv:2501.03262): group-mean baseline, then batch normalisation.

        r'_i = r_i - mean_j r_j                         over the G completions of one prompt
        G_t  = sum_{s >= t} r'_s                        r'_s: token reward with r'_i at the last token
        A_t  = (G_t - mean(G)) / std(G)                 mean, std over every valid token of the step

    With gamma = 1 (forced here, as OpenRLHF forces it for this estimator) moving the baseline onto the
    last token subtracts mean_j r_j from the return of every valid token of completion i, which is how it
    is computed.

    rewards_PG: [P*G] outcome rewards, each prompt's G completions contiguous (the same rewards that
    token_rewards_B_T carries at each completion's last token); token_rewards_B_T, mask_B_T: [B, T] with
    B = P*G. Returns [B, T], zero outside the mask. std: biased, 1e-8 variance floor (OpenRLHF).
    Deviations: none from OpenRLHF's `reinforce_baseline`.
    """
    _require_groups("reinforce_pp_baseline", group_size, 2)
    r_P_G = rewards_PG.detach().view(-1, group_size)
    group_mean_B = r_P_G.mean(dim=1, keepdim=True).expand_as(r_P_G).flatten()
    returns_B_T = _discounted_returns(token_rewards_B_T, mask_B_T, gamma=1.0)
    returns_B_T = returns_B_T - group_mean_B[:, None] * mask_B_T.to(returns_B_T.dtype)
    return _normalise_over_tokens(returns_B_T, mask_B_T, scale_std=scale_std)


@advantage("turn_returns")
def turn_returns(
    token_rewards_B_T: Tensor,
    turn_ids_B_T: Tensor,
    mask_B_T: Tensor,
    *,
    group_size: int,
    gamma: float = 1.0,
    scale_std: bool = True,
    eps: float = 1e-4,
) -> Tensor:
    """Turn-level discounted returns with a group baseline, for multi-turn episodes.

        r_k = sum of the token rewards of turn k        (an environment's reward for the turn; the outcome on the last)
        G_k = sum_{j >= k} gamma^(j - k) r_j            the return from turn k, discounted per turn, not per token
        A_t = (G_{k(t)} - mean_i G_0) / (std_i G_0 + eps)  every token of turn k(t); mean, std over the group's episodes
        scale_std=False:  A_t = G_{k(t)} - mean_i G_0

    The baseline is GRPO's (Shao et al. 2024, arXiv:2402.03300) on the episodes' whole returns G_0: with gamma = 1
    and only an outcome reward every turn's return is G_0 and this is GRPO exactly. A turn is credited with the
    rewards from it on, not with earlier turns' (returns-to-go), and gamma < 1 weighs the nearer ones more (per-turn
    discounting as in multi-turn agent RL, e.g. SkyRL's per-step returns).

    token_rewards_B_T: [B, T] rewards at the turns' last tokens (B = P*G, each prompt's G contiguous);
    turn_ids_B_T: [B, T] int64, the turn (0, 1, ...) of each model token, -1 elsewhere; mask_B_T: [B, T] bool.
    Returns [B, T], zero outside the mask. std: unbiased, as `grpo`.
    Deviations: a token reward outside every turn (turn id -1) is not counted.
    """
    _require_groups("turn_returns", group_size, 2)
    valid_B_T = (turn_ids_B_T >= 0) & mask_B_T
    turns = int(turn_ids_B_T.max().clamp(min=0).item()) + 1
    index_B_T = turn_ids_B_T.clamp(min=0)
    r_B_K = torch.zeros(turn_ids_B_T.shape[0], turns, dtype=torch.float32, device=turn_ids_B_T.device)
    r_B_K.scatter_add_(1, index_B_T, torch.where(valid_B_T, token_rewards_B_T.detach().float(), 0.0))
    returns_B_K = torch.zeros_like(r_B_K)
    running_B = torch.zeros_like(r_B_K[:, 0])
    for k in reversed(range(turns)):
        running_B = r_B_K[:, k] + gamma * running_B
        returns_B_K[:, k] = running_B
    g0_P_G = returns_B_K[:, 0].view(-1, group_size)
    mean_B = g0_P_G.mean(dim=1, keepdim=True).expand_as(g0_P_G).flatten()
    adv_B_T = returns_B_K.gather(1, index_B_T) - mean_B[:, None]
    if scale_std:
        adv_B_T = adv_B_T / (g0_P_G.std(dim=1, keepdim=True).expand_as(g0_P_G).flatten()[:, None] + eps)
    return torch.where(valid_B_T, adv_B_T, 0.0)


@advantage("reinforce")
def reinforce(rewards_PG: Tensor, baseline: Tensor) -> Tensor:
    """REINFORCE with a moving-average baseline (Williams 1992, Machine Learning 8:229-256).

        A_i = r_i - b        b: the loop's running mean of past batch rewards (0-dim tensor)

    rewards_PG: [P*G]. Returns [P*G].
    Deviations: none (Williams allows any baseline that does not depend on the action; a running mean of
    past rewards is the reinforcement-comparison baseline he discusses).
    """
    return rewards_PG.detach() - baseline.detach()


@advantage("bnpo")
def bnpo(
    rewards_PG: Tensor,
    *,
    group_size: int,
    reward_min: float = 0.0,
    reward_max: float = 1.0,
    max_weight: float = 1e6,
) -> Tensor:
    """Beta normalisation policy optimisation (Xiao et al. 2025, arXiv:2506.02864): the group-mean baseline, divided
    by a Beta density fitted to the step's group accuracies.

        r'_i      = (r_i - reward_min) / (reward_max - reward_min)          rewards mapped to [0, 1]
        p_q       = mean_j r'_j over the G completions of prompt q          (the prompt's expected reward)
        m, v      = mean and unbiased variance of p_q over the step's P prompts
        a, b      = (m (1 - m) / v - 1) * m,  (m (1 - m) / v - 1) * (1 - m)   (method-of-moments Beta fit to the p_q)
        alpha     = max(1 + a / 3, 1),  beta = max(1 + b / 3, 1)
        A_i       = min(1 / Beta(p_q; alpha, beta), max_weight) * (r'_i - p_q)

    alpha = beta = 1 (a uniform density) is REINFORCE with the group mean as baseline. Every step is the authors' code
    (github.com/changyi7231/BNPO, recipe/bnpo/src/bnpo_ray_trainer.py, `compute_bnpo_outcome_advantage`): the affine
    map with min 0 and max 1, the 1/3 factors, the clamps at 1 and the weight cap of 1e6; one prompt in the step
    gives m = 0 and v = 1 there, as here.

    rewards_PG: [P*G], each prompt's G completions contiguous, within [reward_min, reward_max] (checked; the authors'
    code asserts it). Returns [P*G].
    Deviations: where the p_q are all equal (v = 0) the authors' code divides by zero and gives NaN advantages; here
    alpha = beta = 1 (weight 1). The density is computed in float64 with xlogy, so p = 0 or 1 with alpha or beta = 1
    is finite. The paper's advantage decomposition (one BNPO advantage per reward component, averaged) is not
    implemented: this reads the summed reward.
    """
    _require_groups("bnpo", group_size, 2)
    if not reward_max > reward_min:
        raise ValueError(f"advantage 'bnpo': reward_max={reward_max} must be > reward_min={reward_min}")
    r_P_G = (rewards_PG.detach().double().view(-1, group_size) - reward_min) / (reward_max - reward_min)
    if bool(((r_P_G < 0) | (r_P_G > 1)).any()):
        raise ValueError(f"advantage 'bnpo': rewards outside [reward_min, reward_max] = [{reward_min}, {reward_max}]; "
                         "set rl.advantage_args.reward_min / reward_max to the reward's range")  # fmt: skip
    p_P = r_P_G.mean(dim=1)
    m, v = (p_P.mean(), p_P.var()) if len(p_P) > 1 else (p_P.new_tensor(0.0), p_P.new_tensor(1.0))
    if v > 0:
        spread = m * (1 - m) / v - 1
        alpha, beta = (1 + spread * m / 3).clamp(min=1.0), (1 + spread * (1 - m) / 3).clamp(min=1.0)
    else:
        alpha, beta = p_P.new_tensor(1.0), p_P.new_tensor(1.0)
    log_density_P = (
        torch.xlogy(alpha - 1, p_P) + torch.xlogy(beta - 1, 1 - p_P)
        - (torch.lgamma(alpha) + torch.lgamma(beta) - torch.lgamma(alpha + beta))
    )  # fmt: skip
    weight_P = (-log_density_P).exp().clamp(max=max_weight)
    return (weight_P[:, None] * (r_P_G - p_P[:, None])).flatten().to(rewards_PG.dtype)


@advantage("spo")
def spo(rewards_PG: Tensor, *, group_size: int) -> Tensor:
    """Self-play preference optimisation, the minimaximalist approach (Swamy et al. 2024, arXiv:2401.04056): each
    completion's reward is the share of the other completions of its prompt it is preferred to, a win rate against
    the policy itself, with no reward model; the group's mean win rate, 1/2, is the baseline.

        pref(i, j) = 1 if r_i > r_j,  1/2 if r_i = r_j,  0 if r_i < r_j      (hard preferences from the scores)
        w_i        = 1/(G-1) * sum_{j != i} pref(i, j)
        A_i        = w_i - 1/2                                              (the mean of w over a group is 1/2)

    rewards_PG: [P*G] scores, each prompt's G completions contiguous; only their order within a group matters.
    Returns [P*G] in [-1/2, 1/2].
    Deviations: the paper queries a preference function for every pair (which may be intransitive); the RL loop scores
    completions one by one, so here the preference is read off the scores (a verifier's right > wrong). The paper
    feeds the win rate to PPO or SAC as the reward; here it is the advantage directly, with the exact group mean
    1/2 as baseline.
    """
    _require_groups("spo", group_size, 2)
    r_P_G = rewards_PG.detach().view(-1, group_size)
    diff_P_G_G = r_P_G[:, :, None] - r_P_G[:, None, :]
    prefs_P_G_G = (diff_P_G_G > 0).to(r_P_G.dtype) + 0.5 * (diff_P_G_G == 0).to(r_P_G.dtype)
    win_P_G = (prefs_P_G_G.sum(dim=2) - 0.5) / (group_size - 1)  # the diagonal (i vs i) is a tie, 1/2
    return (win_P_G - 0.5).flatten()


# --- sequence values as per-token tensors (not registered: every loop uses them the same way) ---


def outcome_at_last_token(rewards_PG: Tensor, mask_B_T: Tensor) -> Tensor:
    """[B, T] with each completion's scalar reward on its last generated token, 0 elsewhere."""
    positions_B_T = torch.arange(mask_B_T.shape[1], device=mask_B_T.device).expand_as(mask_B_T)
    last_B = torch.where(mask_B_T, positions_B_T, -1).max(dim=1).values
    is_last_B_T = (positions_B_T == last_B[:, None]) & mask_B_T
    return is_last_B_T.float() * rewards_PG.to(mask_B_T.device)[:, None]


def per_token(adv: Tensor, mask_B_T: Tensor) -> Tensor:
    """An advantage of [P*G] broadcast over each completion's tokens, or a [B, T] one; 0 off the mask."""
    adv_B_T = adv[:, None].expand(mask_B_T.shape) if adv.dim() == 1 else adv
    return torch.where(mask_B_T, adv_B_T.to(torch.float32), 0.0).detach()


def group_reward_inputs(rewards_PG: Tensor, group_size: int) -> dict[str, Tensor]:
    """The `group_rewards` need of a policy loss: each row's reward and its group's mean, both [P*G], detached."""
    r_P_G = rewards_PG.detach().view(-1, group_size)
    mean_P_G = r_P_G.mean(dim=1, keepdim=True).expand_as(r_P_G)
    return {"rewards_B": r_P_G.flatten(), "group_mean_rewards_B": mean_P_G.flatten()}
