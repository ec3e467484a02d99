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


def init_ranks(device_type: str, *, group: bool = False) -> Ranks:
    """The ranks torchrun started (WORLD_SIZE, RANK, LOCAL_RANK in the environment), with the process group
    initialised on first use (gloo on CPU, NCCL on CUDA); `Ranks()` for a single process, which gets a process group
    of one only when `group` asks (FSDP2 shards over a group, of one rank too)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if group:
            init_group_of_one(device_type)
        return Ranks()
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return ranks


def init_group_of_one(device_type: str) -> None:
    """A process group holding this process alone, on a free loopback port."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def broadcast_object(value: T, ranks: Ranks) -> T:
    """The main rank's `value` on every rank."""
    return all_gather_objects(value, ranks)[0] if ranks.distributed else value


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


def scale_gradients(parameters: Sequence[torch.nn.Parameter], factor: float) -> None:
    """Multiply every gradient by `factor` (FSDP2 averages over ranks where the losses want the sum)."""
    if factor != 1:
        for p in parameters:
            if p.grad is not None:
                p.grad.mul_(factor)


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


def gather_rows(values: dict[str, Any], ranks: Ranks, rows_of: str) -> tuple[dict[str, Any], slice]:
    """Every rank's rows of each tensor in `values` (first axis: rows; a second axis is padded with zeros to the
    widest rank's), concatenated in rank order, so that a function of the whole step's batch (an advantage that
    normalises over the batch) sees what one process would; and the slice of the rows that are this rank's.
    0-dim tensors and plain values pass unchanged; the slice counts the rows of `values[rows_of]`. For one process:
    `values` and all its rows."""
    sizes = {key: len(v) for key, v in values.items() if isinstance(v, Tensor) and v.dim() >= 1}
    if not ranks.distributed or not sizes:
        return values, slice(None)
    import torch.distributed as dist

    counts = all_gather_objects({key: (size, values[key].shape[1:]) for key, size in sizes.items()}, ranks)
    gathered = dict(values)
    for key in sizes:
        local = values[key]
        rows = [c[key][0] for c in counts]
        width = max(c[key][1][0] for c in counts) if local.dim() >= 2 else None
        padded = torch.zeros(max(rows), *((width,) if width else ()), *local.shape[2:], dtype=local.dtype,
                             device=local.device)  # fmt: skip
        if width:
            padded[: len(local), : local.shape[1]] = local
        else:
            padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(ranks.world)]
        dist.all_gather(parts, padded)
        gathered[key] = torch.cat([part[:n] for part, n in zip(parts, rows, strict=True)])
    before = sum(c[rows_of][0] for c in counts[: ranks.rank])
    return gathered, slice(before, before + sizes[rows_of])
