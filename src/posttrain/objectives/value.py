"""Value (critic) losses."""

from __future__ import annotations

import torch
from torch import Tensor


def clipped_value_loss(
    values_B_T: Tensor, old_values_B_T: Tensor, returns_B_T: Tensor, *, clip_range: float = 0.2
) -> Tensor:
    """PPO's clipped value loss, per token (Schulman et al. 2017, arXiv:1707.06347, as implemented in
    OpenAI Baselines `ppo2`; discussed by Engstrom et al. 2020, arXiv:2005.12729).

        v_clip = old_v + clip(v - old_v, -clip_range, clip_range)
        loss_t = 0.5 * max((v - R)^2, (v_clip - R)^2)

    values_B_T: [B, T] the critic's current values (with gradient); old_values_B_T: [B, T] its values
    when the rollout was scored; returns_B_T: [B, T] value targets (GAE's lambda-returns, advantages +
    old values). Returns [B, T], not masked and not reduced: the loop aggregates it over the completion
    mask like a policy loss.

    Default clip_range=0.2 as in Baselines' `ppo2` and TRL's PPOTrainer before 1.16 (`cliprange_value`).
    Deviations: the PPO paper's value loss is the unclipped squared error; the clip is the
    implementation's addition that PPO codebases keep (Engstrom et al. did not find it reliably helpful;
    a large clip_range turns it off).
    """
    clipped_B_T = old_values_B_T + (values_B_T - old_values_B_T).clamp(-clip_range, clip_range)
    unclipped_loss_B_T = (values_B_T - returns_B_T).square()
    return 0.5 * unclipped_loss_B_T.maximum((clipped_B_T - returns_B_T).square())


def lambda_returns(
    token_rewards_B_T: Tensor, values_B_T: Tensor, mask_B_T: Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> Tensor:
    """Lambda-returns, the critic's value targets (Schulman et al. 2016, arXiv:1506.02438, Eq. 18).

        delta_t = r_t + gamma * V_{t+1} - V_t          (V after the last valid token = 0)
        A_t     = delta_t + gamma * lam * A_{t+1}      (un-whitened GAE)
        R_t     = A_t + V_t

    token_rewards_B_T, values_B_T: [B, T]; mask_B_T: [B, T] bool completion mask. Returns [B, T], zero
    outside the mask, detached. Positions outside the mask are skipped, as in `advantages.gae`.
    Defaults gamma=1.0, lam=0.95 are gae's (the loop passes rl.advantage_args' gamma and lam when set).
    Deviations: none.
    """
    rewards_B_T, values_B_T = token_rewards_B_T.detach(), values_B_T.detach()
    next_value_B = torch.zeros_like(values_B_T[:, 0])
    running_B = torch.zeros_like(values_B_T[:, 0])
    returns_T = []
    for t in reversed(range(rewards_B_T.shape[1])):
        valid_B = mask_B_T[:, t]
        delta_B = rewards_B_T[:, t] + gamma * next_value_B - values_B_T[:, t]
        running_B = torch.where(valid_B, delta_B + gamma * lam * running_B, running_B)
        next_value_B = torch.where(valid_B, values_B_T[:, t], next_value_B)
        returns_T.append(torch.where(valid_B, running_B + values_B_T[:, t], torch.zeros_like(running_B)))
    return torch.stack(returns_T[::-1], dim=1)
