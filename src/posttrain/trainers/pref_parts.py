"""Parts the preference loops (`preference.py` offline, `online_preference.py` in rounds) share: the
policy and its frozen reference, a micro-batch's objective inputs, BCO's running reward shift, and the
implicit-reward metrics. No loss maths lives here: every formula is a registered function in `objectives/`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from posttrain.config.pref import PrefConfig
from posttrain.objectives.registry import PREFERENCE_LOSSES
from posttrain.policies import Reference
from posttrain.runtime.logging import track
from posttrain.trainers.build import policy_and_reference
from posttrain.trainers.offline import Tokens, as_rows, collate_feedback, objective_inputs, sequence_logps


def build_models(
    cfg: PrefConfig, model: Any, tokenizer: Any, checkpoint: Path | None, device: torch.device
) -> tuple[Any, Any, Any]:
    """(policy, tokenizer, reference or None): `policy_and_reference` with the loss's needs."""
    return policy_and_reference(
        cfg.model, model, tokenizer, checkpoint,
        needs_reference="reference" in PREFERENCE_LOSSES[cfg.pref.loss].needs,
        seed=cfg.seed, device=device, recipe_dir=cfg.recipe_dir, run_dir=Path(cfg.output_dir),
    )  # fmt: skip


def preference_inputs(
    model: Any,
    reference: Reference | None,
    items: list[Tokens],
    cached: list[Tensor] | None,
    pad_id: int,
    device: torch.device,
    bf16: bool,
    length_normalize: bool,
) -> dict[str, Tensor]:
    """The policy's inputs for a micro-batch (one forward), plus the reference's: from `cached` per-item
    log-probs when given, else from a forward of `reference` when there is one."""
    batch = collate_feedback(items, pad_id=pad_id)
    logp_B, len_B = sequence_logps(model, batch, device, bf16=bf16)
    ref_B = None
    if cached is not None:
        ref_B = as_rows(cached, items).to(device)
    elif reference is not None:
        with torch.no_grad(), reference.active():
            ref_B = sequence_logps(reference.model, batch, device, bf16=bf16)[0]
    if length_normalize:
        logp_B = logp_B / len_B.clamp(min=1.0)
        ref_B = None if ref_B is None else ref_B / len_B.clamp(min=1.0)
    inputs = objective_inputs(logp_B, len_B, items)
    if ref_B is not None:
        inputs |= objective_inputs(ref_B, len_B, items, prefix="ref_")
    return inputs


def log_ratios(inputs: dict[str, Tensor]) -> Tensor:
    """Every completion's detached policy/reference log-ratio in a micro-batch's inputs, flattened."""
    keys = [k for k in ("chosen", "rejected", "logps", "logps_N_K") if k in inputs]
    return torch.cat([(inputs[k] - inputs.get(f"ref_{k}", 0.0)).detach().flatten() for k in keys])


@dataclass
class RunningMean:
    """The mean of every value added so far: BCO's reward shift (the `reward_shift` need), in log-ratio
    units. Its state goes into each step's metrics (`state`), and a resumed run reads it back."""

    total: float = 0.0
    count: int = 0

    def add(self, values: Tensor) -> None:
        self.total += float(values.sum())
        self.count += values.numel()

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def state(self) -> dict[str, float]:
        return {"reward_shift_sum": self.total, "reward_shift_count": float(self.count)}

    @classmethod
    def from_history(cls, history: list[dict[str, float]]) -> RunningMean:
        last = history[-1] if history else {}
        return cls(last.get("reward_shift_sum", 0.0), int(last.get("reward_shift_count", 0)))


def add_preference_metrics(totals: dict[str, float], inputs: dict[str, Tensor], scale: float) -> None:
    """Sums over examples of implicit rewards (scale * log-ratio, or scale * log-prob without a
    reference), their margin, preference accuracy and log-probs; divided by the count when logged."""
    if "chosen" in inputs:
        r_c = scale * (inputs["chosen"] - inputs.get("ref_chosen", 0.0)).detach()
        r_r = scale * (inputs["rejected"] - inputs.get("ref_rejected", 0.0)).detach()
        totals["reward_chosen"] += float(r_c.sum())
        totals["reward_rejected"] += float(r_r.sum())
        totals["reward_margin"] += float((r_c - r_r).sum())
        totals["pref_accuracy"] += float((r_c > r_r).sum())
        totals["logp_chosen"] += float(inputs["chosen"].detach().sum())
        totals["logp_rejected"] += float(inputs["rejected"].detach().sum())
    elif "labels" in inputs:
        r = scale * (inputs["logps"] - inputs.get("ref_logps", 0.0)).detach()
        sign = inputs["labels"].float() * 2 - 1
        totals["reward_signed"] += float((sign * r).sum())
        totals["logp"] += float(inputs["logps"].detach().sum())
    else:
        r_N_K = scale * (inputs["logps_N_K"] - inputs.get("ref_logps_N_K", 0.0)).detach()
        best_N = inputs["scores_N_K"].argmax(dim=1)
        totals["pref_accuracy"] += float((r_N_K.argmax(dim=1) == best_N).sum())


@torch.no_grad()
def evaluate_pairs(
    model: Any,
    reference: Reference | None,
    items: list[Tokens],
    cached: list[Tensor] | None,
    scale: float,
    size: int,
    pad_id: int,
    device: torch.device,
    bf16: bool,
    length_normalize: bool,
) -> dict[str, float]:
    """Held-out implicit-reward metrics (accuracy: chosen reward > rejected), as `eval_*`."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = defaultdict(float)
    for start in track(range(0, len(items), size), f"held-out pairs, {len(items)} examples", unit="batches"):
        mb = items[start : start + size]
        mb_cached = cached[start : start + size] if cached is not None else None
        inputs = preference_inputs(model, reference, mb, mb_cached, pad_id, device, bf16, length_normalize)
        add_preference_metrics(totals, inputs, scale)
    model.train(was_training)
    return {f"eval_{k}": v / len(items) for k, v in totals.items()}
