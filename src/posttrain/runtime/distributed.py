"""Data-parallel training over torch.distributed: the ranks of a run, and the few collectives the loops need.

    posttrain sft recipe.yaml --nproc 2          # launches torchrun --nproc-per-node 2 -m posttrain sft recipe.yaml
    torchrun --nproc-per-node 2 -m posttrain sft recipe.yaml

Every rank holds the whole model and takes its share of each step's global batch; the losses are sums over the
rank's examples divided by the global count (tokens, sequences, examples), so summing the gradients over ranks
(`sum_gradients`) gives the single-process update on the same global batch, up to float rounding. gloo on CPU,
NCCL on GPUs. A single process (no WORLD_SIZE in the environment) is `Ranks()`: every collective is the identity
and nothing is imported or initialised, so `breakpoint()` works as ever.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank, how many ranks, and its rank on this machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The rank that logs, evaluates and writes the run's files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's share of a step's global batch: every world-th item from its rank (each rank's share differs
        in size by at most one; the counts that divide the loss are global)."""
        return list(items[self.rank :: self.world])

    def contiguous_share(self, count: int) -> slice:
        """This rank's contiguous block of `count` items (RL prompts: a group never straddles ranks); count must
        divide by the world size (the config checks it)."""
        per = count // self.world
        return slice(self.rank * per, (self.rank + 1) * per)


ONE_PROCESS = Ranks()
"""The ranks of a single-process run (every collective is the identity)."""


def init_ranks(device_type: str) -> Ranks:
    """The ranks torchrun started (WORLD_SIZE, RANK, LOCAL_RANK in the environment), with the process group
    initialised on first use (gloo on CPU, NCCL on CUDA); `Ranks()` for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return ranks


def all_reduce_sum(value: float | Tensor, ranks: Ranks) -> Any:
    """The sum over ranks of a number or a tensor (on its own device); the value itself for one process."""
    if not ranks.distributed:
        return value
    import torch.distributed as dist

    tensor = value.clone() if isinstance(value, Tensor) else torch.tensor(float(value), dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor if isinstance(value, Tensor) else float(tensor)


def sum_gradients(parameters: Sequence[torch.nn.Parameter], ranks: Ranks) -> None:
    """Replace each gradient by its sum over ranks (one collective over a flat buffer per dtype and device). A
    parameter without a gradient on one rank takes part as zeros, so every rank reduces the same buffer."""
    if not ranks.distributed:
        return
    import torch.distributed as dist

    trainable = [p for p in parameters if p.requires_grad]
    for p in trainable:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    groups: dict[tuple[torch.dtype, torch.device], list[torch.nn.Parameter]] = {}
    for p in trainable:
        groups.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for params in groups.values():
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()


def any_rank(flag: bool, ranks: Ranks) -> bool:
    """Whether the flag is set on any rank (a stop request seen by one rank stops them all at the same step)."""
    return bool(all_reduce_sum(float(flag), ranks)) if ranks.distributed else flag


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        import torch.distributed as dist

        dist.barrier()


def all_gather_objects(value: T, ranks: Ranks) -> list[T]:
    """Every rank's `value` (picklable), in rank order; [value] for one process."""
    if not ranks.distributed:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * ranks.world
    dist.all_gather_object(gathered, value)
    return gathered
