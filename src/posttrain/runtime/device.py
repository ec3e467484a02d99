"""Device and thread choices."""

from __future__ import annotations

import os
from typing import Any

import torch

from posttrain.errors import PosttrainError

DEVICES = "auto, cpu, cuda, cuda:N, mps"
_INSTEAD = "use device=cpu or device=auto"


class DeviceError(PosttrainError, ValueError):
    """A `device` that torch does not know, or that this machine does not have."""


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; anything else must be a device this machine has.

    Raises DeviceError naming `device`, the value and what would work: an unknown name (`banana`), CUDA or MPS
    where torch sees none, a GPU index past the last one (`cuda:3` on a one-GPU machine).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"device: '{name}' is not a device; use one of {DEVICES}") from None
    if device.type == "cuda":
        _check_cuda(name, device.index)
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device: '{name}' was asked for but MPS (Apple GPU) is not available here; {_INSTEAD}")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device: '{name}' is not supported; use one of {DEVICES}")
    return device


def _check_cuda(name: str, index: int | None) -> None:
    if not torch.cuda.is_available():
        build = "a CPU-only build of torch" if torch.version.cuda is None else "no CUDA device is visible"
        raise DeviceError(f"device: '{name}' was asked for but CUDA is not available ({build}); {_INSTEAD}")
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise DeviceError(
            f"device: '{name}' asks for GPU {index}, but this machine has {count} CUDA device(s), "
            f"cuda:0 to cuda:{count - 1}; use one of them, or device=cuda"
        )


def limit_cpu_threads(workers: int = 0) -> int:
    """Keep the trainer's torch threads plus its worker processes within the cores.

    DESIGN.md: on a 2-core machine, two processes with two torch threads each made one GRPO step 25x
    slower (OpenMP spin-waits). An explicit OMP_NUM_THREADS from the user wins.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's processes on this machine share its cores
    threads = max(1, (os.cpu_count() or 1) // ranks_here - workers)
    torch.set_num_threads(threads)
    return threads


def rank_device(device: torch.device, ranks: Any) -> torch.device:
    """The device of a rank: its own GPU (cuda:LOCAL_RANK) when the run is on CUDA, else the CPU."""
    return torch.device("cuda", ranks.local_rank) if device.type == "cuda" else device
