"""Checkpoints of a model sharded with FSDP2: every rank writes its shards of the weights and the optimiser state
through torch.distributed.checkpoint, which reads them back onto any number of ranks (it reshards on load); and the
whole weights gathered once, for the checkpoint's and `final/`'s Hugging Face directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SHARDS_DIR = "shards"
"""The directory of a checkpoint that holds torch.distributed.checkpoint's files (sharded runs only)."""


def save_shards(model: Any, optimizer: Any, directory: Path) -> dict[str, Any]:
    """Write this rank's shards of the model and the optimiser into `directory` (every rank calls it), and return the
    model's whole weights, gathered to the CPU (every rank takes part; the main rank writes them)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=str(directory))
    return gathered_weights(model)


def load_shards(model: Any, optimizer: Any, directory: Path) -> None:
    """Read the model's and the optimiser's state from `directory` onto this run's ranks, however many wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(directory))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def gathered_weights(model: Any) -> dict[str, Any]:
    """The model's whole weights on the CPU (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
