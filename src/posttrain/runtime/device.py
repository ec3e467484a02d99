"""Device and thread choices."""

from __future__ import annotations

import os

import torch


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: '{name}' was asked for but CUDA is not available; use device=cpu")
    return device


def limit_cpu_threads(workers: int = 0) -> int:
    """Keep the trainer's torch threads plus its worker processes within the cores.

    DESIGN.md: on a 2-core machine, two processes with two torch threads each made one GRPO step 25x
    slower (OpenMP spin-waits). An explicit OMP_NUM_THREADS from the user wins.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    threads = max(1, (os.cpu_count() or 1) - workers)
    torch.set_num_threads(threads)
    return threads
