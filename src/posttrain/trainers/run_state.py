"""What every trainer does at the end of a step: clip and step the optimiser, save and restore run state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from posttrain.policies import save_pretrained
from posttrain.runtime.checkpoint import Checkpointer
from posttrain.runtime.seeding import capture_rng_states
from posttrain.trainers.build import EpochSampler


def clip_and_step(model: Any, optim: Any, max_grad_norm: float | None) -> float:
    norm = torch.nn.utils.clip_grad_norm_(
        [p for p in model.parameters() if p.requires_grad], max_grad_norm or float("inf")
    )
    optim.optimizer.step()
    optim.scheduler.step()
    optim.optimizer.zero_grad(set_to_none=True)
    return float(norm)


def save_checkpoint(
    checkpointer: Checkpointer,
    step: int,
    model: Any,
    tokenizer: Any,
    optim: Any,
    sampler: EpochSampler,
    generator: torch.Generator,
    history: list[dict[str, float]],
) -> None:
    state = {
        "optimizer": optim.optimizer.state_dict(),
        "scheduler": optim.scheduler.state_dict(),
        "data": sampler.state_dict(),
        "rng": capture_rng_states({"sampling": generator}),
        "history": history,
    }
    checkpointer.save(step, save_model=lambda d: save_pretrained(model, tokenizer, d), state=state)


def rewrite_metrics(run_dir: Path, history: list[dict[str, float]]) -> None:
    """After a resume, metrics.jsonl holds exactly the checkpoint's history (later lines were lost work)."""
    lines = [json.dumps({"kind": "train", **h}) for h in history]
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
