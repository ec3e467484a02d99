"""How an RL step's loss terms combine: the policy surrogate, the KL penalty in the loss, the entropy bonus, and
the critic's weighted value loss. Pure functions of tensors, like every objective; the loop aggregates the result
once (`aggregation.py`), so every term is averaged the same way.
"""

from __future__ import annotations

from torch import Tensor

from posttrain.objectives.policy_losses import entropy_bonus


def policy_objective(
    surrogate_B_T: Tensor,
    mask_B_T: Tensor,
    *,
    kl_B_T: Tensor | None = None,
    kl_coef: float = 0.0,
    entropy_B_T: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> Tensor:
    """The per-token policy loss (PPO, Schulman et al. 2017, arXiv:1707.06347, Eq. 9; GRPO's KL in the loss,
    Shao et al. 2024, arXiv:2402.03300, Eq. 3):

        l_t = surrogate_t + beta * KL_t - c_H * H_t          KL_t counted on the mask only

    surrogate_B_T, kl_B_T, entropy_B_T: [B, T]; mask_B_T: bool [B, T]. Returns [B, T]. A term whose tensor is None
    or whose coefficient is 0 adds nothing. Deviations: none. TRL token-averages its entropy bonus whatever the
    loss's aggregation; here it is aggregated with the rest (docs/online-rl.md).
    """
    loss_B_T = surrogate_B_T
    if kl_B_T is not None and kl_coef:
        loss_B_T = loss_B_T + kl_coef * kl_B_T.masked_fill(~mask_B_T, 0.0)
    if entropy_B_T is not None and entropy_coef:
        loss_B_T = loss_B_T + entropy_bonus(entropy_B_T, coef=entropy_coef)
    return loss_B_T


def critic_objective(value_loss: Tensor, *, value_coef: float) -> Tensor:
    """The critic's loss as PPO weights it in its combined objective (arXiv:1707.06347, Eq. 9: c_1 L^VF). The
    critic has its own optimiser here, so the weight scales its gradient only. 0-dim in, 0-dim out."""
    return value_coef * value_loss
