"""Seeds and random-number-generator state: everything a resumed run needs to draw the same numbers."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator for the run's own sampling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def capture_rng_states(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Every RNG's state as tensors and plain Python values, which `torch.load(weights_only=True)` reads back."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    random.setstate(_as_tuples(states["python"]))
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    for name, state in states["generators"].items():
        if name in generators:
            generators[name].set_state(state)
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_tuples(value: Any) -> Any:
    """random.setstate needs tuples where a round trip may have made lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value
