"""Optimiser and learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def build_adamw(
    parameters: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.AdamW:
    """AdamW; biases and norm weights (1-D tensors) get no weight decay, as in GPT-2 / nanoGPT."""
    params = [p for p in parameters if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters (is every weight frozen?)")
    # FSDP2's sharded parameters (DTensors) and whole ones take separate groups: one fused kernel cannot mix them
    kinds = sorted({type(p).__name__ == "DTensor" for p in params})
    groups = [
        {"params": [p for p in params if (p.dim() >= 2) == decayed and (type(p).__name__ == "DTensor") == kind],
         "weight_decay": weight_decay if decayed else 0.0}
        for kind in kinds for decayed in (True, False)
    ]  # fmt: skip
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, fused=fused_adamw_runs_on(params))


def fused_adamw_runs_on(params: list[torch.nn.Parameter]) -> bool | None:
    """Whether to take torch's fused AdamW kernel: float parameters all on one CPU or CUDA device type.

    One kernel over every parameter instead of a chain of foreach ops, several times faster on CPU
    (bench/RESULTS.md, "optimiser step"). None leaves torch's default.
    """
    device_types = {p.device.type for p in params}
    one_kind = len(device_types) == 1 and device_types <= {"cpu", "cuda"}
    return True if one_kind and all(p.is_floating_point() for p in params) else None


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float) -> float:
    """Linear warm-up from lr/warmup to lr, then cosine or linear decay to min_ratio*lr at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - (1 - min_ratio) * progress
    raise ValueError(f"schedule: {schedule!r}; allowed: cosine, linear, constant")


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(
            step, warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule, min_ratio=min_ratio
        ),
    )


def lr_of_last_step(scheduler: torch.optim.lr_scheduler.LambdaLR) -> float:
    """The learning rate the optimiser's last updates used, once the schedule has moved on to the next step's
    (trainers step the schedule at the end of a step, then log it): base lr x multiplier of the step before."""
    return scheduler.base_lrs[0] * scheduler.lr_lambdas[0](scheduler.last_epoch - 1)
