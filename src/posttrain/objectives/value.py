"""Value (critic) losses."""

from __future__ import annotations

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

    Default clip_range=0.2 as in Baselines' `ppo2` and TRL's PPO (`cliprange_value`).
    Deviations: the PPO paper's value loss is the unclipped squared error; the clip is the
    implementation's addition that PPO codebases keep (Engstrom et al. did not find it reliably helpful;
    a large clip_range turns it off).
    """
    clipped_B_T = old_values_B_T + (values_B_T - old_values_B_T).clamp(-clip_range, clip_range)
    unclipped_loss_B_T = (values_B_T - returns_B_T).square()
    return 0.5 * unclipped_loss_B_T.maximum((clipped_B_T - returns_B_T).square())
