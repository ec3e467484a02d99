"""Loss aggregation: per-token losses [B, T] -> the scalar an optimiser step minimises.

Each aggregation is registered with `@aggregation(name)` and names, after `loss_B_T, mask_B_T`, only the
step-wide counts it uses (keyword-only): `num_tokens` (valid completion tokens in the whole optimiser
step, over every micro-batch and rank), `num_seqs` (sequences in the whole optimiser step) and
`max_len` (the configured maximum completion length). Because every denominator is a step-wide
constant, the sum of an aggregation over the micro-batches of a step equals its value on the whole step
(DESIGN.md, "Batch semantics"); the loop sums the micro-batch losses (gradient accumulation) and never
averages them again.

Positions outside mask_B_T are ignored even if they hold NaN or inf.
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.objectives.registry import aggregation


def _masked(loss_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
    return torch.where(mask_B_T, loss_B_T, torch.zeros_like(loss_B_T))


def _positive(count: int | Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(count, dtype=like.dtype, device=like.device).clamp(min=1.0)


@aggregation("token_mean")
def token_mean(loss_B_T: Tensor, mask_B_T: Tensor, *, num_tokens: int | Tensor) -> Tensor:
    """Mean over every valid token of the step (DAPO's token-level loss, Yu et al. 2025, arXiv:2503.14476).

        L = 1/N * sum_i sum_{t valid} loss_{i,t}          N = num_tokens, valid tokens in the whole step

    loss_B_T: [B, T]; mask_B_T: [B, T] bool. Returns a 0-dim tensor.
    Deviations: none. (num_tokens < 1 is treated as 1, so a step without tokens gives 0, not NaN.)
    """
    return _masked(loss_B_T, mask_B_T).sum() / _positive(num_tokens, loss_B_T)


@aggregation("seq_mean_token_mean")
def seq_mean_token_mean(loss_B_T: Tensor, mask_B_T: Tensor, *, num_seqs: int | Tensor) -> Tensor:
    """Mean over each sequence's tokens, then over sequences (GRPO, Shao et al. 2024, arXiv:2402.03300).

        L = 1/S * sum_i (1/|y_i| * sum_{t valid} loss_{i,t})       S = num_seqs in the whole step

    A sequence without valid tokens contributes 0 and still counts in S, as it does in TRL's `grpo`
    loss. loss_B_T: [B, T]; mask_B_T: [B, T] bool. Returns a 0-dim tensor.
    Deviations: none.
    """
    lengths_B = mask_B_T.sum(dim=1).clamp(min=1).to(loss_B_T.dtype)
    per_seq_B = _masked(loss_B_T, mask_B_T).sum(dim=1) / lengths_B
    return per_seq_B.sum() / _positive(num_seqs, loss_B_T)


@aggregation("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(
    loss_B_T: Tensor, mask_B_T: Tensor, *, num_seqs: int | Tensor, max_len: int
) -> Tensor:
    """Token sum over a constant length, mean over sequences (Dr. GRPO, Liu et al. 2025, arXiv:2503.20783).

        L = 1/S * sum_i (1/L_max * sum_{t valid} loss_{i,t})       S = num_seqs, L_max = max_len

    Dividing by a constant instead of |y_i| removes GRPO's length bias. loss_B_T: [B, T]; mask_B_T: [B, T]
    bool. Returns a 0-dim tensor.
    Deviations: none (TRL's `dr_grpo` divides by batch size * max_completion_length, the same quantity).
    """
    return _masked(loss_B_T, mask_B_T).sum() / (_positive(num_seqs, loss_B_T) * max_len)
