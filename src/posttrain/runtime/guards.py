"""Numerical guard: an optimiser update whose loss or gradients hold NaN or inf is skipped, not applied.

One non-finite gradient applied by AdamW writes NaN into every weight it touches and into the optimiser's
moments, for good. `NonFiniteGuard.step` clips the gradients, then steps the optimiser only when the
total gradient norm (non-finite exactly when some gradient element is) and the loss are finite.
Otherwise it drops the gradients, counts the update in `skipped` (trainers log it as `skipped_steps`) and
logs a warning on the "posttrain.train" logger. After `max_bad_steps` skipped updates in a row it raises
`TrainingStopped`: the weights took none of the bad updates, and the checkpoints already written are
left as they are, the newest being the one to resume from.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Iterable
from typing import Any

import torch

from posttrain.runtime.checkpoint import Checkpointer

logger = logging.getLogger("posttrain.train")


class TrainingStopped(RuntimeError):
    """The run cannot usefully go on (e.g. too many non-finite updates in a row); checkpoints are kept."""


class NonFiniteGuard:
    """Skips non-finite optimiser updates and stops the run after `max_bad_steps` of them in a row.

    checkpointer: named in the stop message (its newest checkpoint is the one to resume from).
    history: metrics of the steps already taken (a resumed run's), so that `skipped` continues from the
        last logged `skipped_steps`.
    """

    def __init__(
        self,
        max_bad_steps: int,
        checkpointer: Checkpointer | None = None,
        history: list[dict[str, float]] | None = None,
    ):
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {max_bad_steps}")
        self.max_bad_steps = max_bad_steps
        self.checkpointer = checkpointer
        self.skipped = int(history[-1].get("skipped_steps", 0)) if history else 0
        """Updates skipped since the run started."""
        self.in_a_row = 0
        """Updates skipped since the last applied one."""

    def step(
        self,
        params: Iterable[torch.nn.Parameter],
        optimizer: Any,
        max_grad_norm: float | None,
        *,
        loss: float | None = None,
        step: int | None = None,
    ) -> float:
        """Clip the gradients of `params` to `max_grad_norm` (None: no clipping), step `optimizer` if the
        loss (when given) and the gradient norm are finite, then zero the gradients. Returns the norm
        before clipping. Raises TrainingStopped at the `max_bad_steps`-th skipped update in a row."""
        trainable = [p for p in params if p.requires_grad]
        grads = [p.grad for p in trainable if p.grad is not None]
        norm_t = total_norm(grads)  # 0 for no gradients
        norm = float(norm_t)
        if math.isfinite(norm) and (loss is None or math.isfinite(loss)):
            clipped_step(optimizer, trainable, norm_t, norm, max_grad_norm)
            self.in_a_row = 0
        else:
            self._skip(norm, loss, step)
        optimizer.zero_grad(set_to_none=True)
        return norm

    def _skip(self, norm: float, loss: float | None, step: int | None) -> None:
        self.skipped += 1
        self.in_a_row += 1
        where = f"step {step}" if step is not None else "update"
        found = f"loss {loss}, gradient norm {norm}" if loss is not None else f"gradient norm {norm}"
        logger.warning(
            "%s: %s; the optimiser update was skipped (%d in a row, %d in this run; the run stops after "
            "train.max_bad_steps=%d in a row)",
            where,
            found,
            self.in_a_row,
            self.skipped,
            self.max_bad_steps,
        )
        if self.in_a_row >= self.max_bad_steps:
            latest = self.checkpointer.latest() if self.checkpointer is not None else None
            resume = f"the newest checkpoint, {latest}, is kept" if latest else "no checkpoint had been written yet"
            raise TrainingStopped(
                f"{where}: {self.in_a_row} optimiser updates in a row had a non-finite loss or gradient "
                f"(last: {found}), reaching train.max_bad_steps={self.max_bad_steps}; the weights took none "
                f"of them and {resume}. Lower train.lr, set train.max_grad_norm, or check the data"
            )


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all the gradients together, as `torch.nn.utils.get_total_norm` (0 for none; inf or NaN when
    an element is). Float32 gradients on CPU take one `torch.dot` of each with itself, faster than the per-tensor
    norms and closer to the float64 norm (`python bench/grad_norm.py`; bench/RESULTS.md, "gradient norm").
    Its float32 squares overflow from elements of about 2e19, as those of torch's norm do; a sum that is not
    finite is taken again by `get_total_norm`, so that the guard skips an update exactly where torch's norm is
    not finite."""
    shards = [g for g in grads if is_sharded(g)]
    if shards:  # FSDP2: the norm over every rank's shards (the same on each), with the whole tensors' beside it
        shard_norm = torch.nn.utils.get_total_norm(shards)
        whole_norm = total_norm([g for g in grads if not is_sharded(g)])
        return torch.linalg.vector_norm(torch.stack([shard_norm.full_tensor(), whole_norm.to(shard_norm.device)]))
    on_cpu = all(g.device.type == "cpu" and g.dtype == torch.float32 for g in grads)
    if not grads or not on_cpu:
        return torch.nn.utils.get_total_norm(grads)
    norm = torch.stack([torch.dot(g.reshape(-1), g.reshape(-1)) for g in grads]).sum().sqrt()
    return norm if math.isfinite(norm) else torch.nn.utils.get_total_norm(grads)


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether a tensor is a DTensor (an FSDP2 parameter or gradient, sharded over ranks)."""
    return type(tensor).__name__ == "DTensor"


def clipped_step(
    optimizer: Any, params: list[torch.nn.Parameter], norm_t: torch.Tensor, norm: float, max_grad_norm: float | None
) -> None:
    """Step `optimizer` with the gradients of `params`, whose total norm is `norm` (`norm_t` as a tensor on the
    gradients' device, `norm` read from it once by the caller), scaled as
    `torch.nn.utils.clip_grad_norm_(params, max_grad_norm)` scales them: by min(1, max_grad_norm / (norm + 1e-6)).

    A fused optimizer (torch's fused AdamW, which `runtime.optim.build_adamw` makes on CPU and CUDA) takes the
    scale as `grad_scale`, the attribute torch's GradScaler sets for it, and divides each gradient by it in the
    kernel that reads them anyway: a pass over every gradient fewer. Any other optimizer gets its gradients scaled
    first."""
    coefficient = 1.0 if max_grad_norm is None else max_grad_norm / (norm + 1e-6)
    if coefficient >= 1.0:
        optimizer.step()
    elif getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale = torch.tensor(1.0 / coefficient, dtype=torch.float32, device=norm_t.device)
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale
    else:
        torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, norm_t)
        optimizer.step()


def step_schedule(scheduler: Any) -> None:
    """Advance a learning-rate schedule, also after a skipped update: the learning rate stays a function
    of the step. torch warns when the very first update was skipped (the optimiser has not stepped
    yet); that order is meant here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
        scheduler.step()
