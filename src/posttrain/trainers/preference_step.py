"""One preference update, shared by the offline loop (`preference.py`) and the online rounds
(`online_preference.py`): a micro-batch's single forward over every completion (a pair's chosen and rejected rows
stacked), the inputs the loss's signature names, the reference's log-probs (precomputed once or per micro-batch),
KTO's reference point, BCO's running reward shift, and the implicit-reward metrics.

No loss maths lives here: every formula is a registered function in `objectives/`.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from posttrain.config.pref import PrefConfig
from posttrain.data import (
    CompletionTokens,
    PreferenceTokens,
    TokenBatch,
    collate_completions,
    collate_preference,
)
from posttrain.data.batching import chunks
from posttrain.objectives.pairing import preference_matrix, win_rates_within_group
from posttrain.objectives.registry import PREFERENCE_LOSSES, call_with
from posttrain.policies import Reference, token_logprobs
from posttrain.runtime.distributed import ONE_PROCESS, Ranks, all_reduce_sum
from posttrain.runtime.logging import track
from posttrain.trainers.build import policy_and_reference
from posttrain.trainers.splits import Tokens


def hyper_default(fn: Callable[..., Any], hyper: dict[str, Any], name: str) -> Any:
    """A hyper-parameter's value: the recipe's, else the function's default; None if it has none."""
    if name in hyper:
        return hyper[name]
    parameter = inspect.signature(fn).parameters.get(name)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def collate_feedback(items: Sequence[Tokens], *, pad_id: int) -> TokenBatch:
    """Pairs: 2N rows, each chosen row followed by its rejected one (one forward for both). Otherwise one row
    per completion."""
    if isinstance(items[0], PreferenceTokens):
        return collate_preference(items, pad_id=pad_id)  # type: ignore[arg-type]
    return collate_completions(items, pad_id=pad_id)[0]  # type: ignore[arg-type]


def sequence_logps(model: Any, batch: TokenBatch, device: torch.device, *, bf16: bool) -> tuple[Tensor, Tensor]:
    """Summed completion log-probs `logp_B` [B] and completion token counts `len_B` [B] (float)."""
    mask_B_T = batch.loss_mask_B_T.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logp_B_T, _ = token_logprobs(
            model, batch.input_ids_B_T.to(device), batch.attention_mask_B_T.to(device), mask_B_T
        )
    return logp_B_T.sum(dim=1), mask_B_T.sum(dim=1).float()


def per_item(values_B: Tensor, items: Sequence[Tokens]) -> list[Tensor]:
    """Split a batch's per-row values [B] into one vector per item (pairs: [chosen, rejected])."""
    if isinstance(items[0], PreferenceTokens):
        return list(values_B.view(-1, 2))
    return list(torch.split(values_B, [len(it.completion_ids) for it in items]))  # type: ignore[union-attr]


def as_rows(vectors: Sequence[Tensor], items: Sequence[Tokens]) -> Tensor:
    """The inverse of `per_item`: per-item vectors back to the batch's row order [B]."""
    if isinstance(items[0], PreferenceTokens):
        return torch.stack(list(vectors)).flatten()
    return torch.cat(list(vectors))


def objective_inputs(
    values_B: Tensor, len_B: Tensor, items: Sequence[Tokens], *, prefix: str = ""
) -> dict[str, Tensor]:
    """Per-row values -> the inputs objectives name: chosen/rejected (+ _len), logps + labels, or
    logps_N_K + scores_N_K. `prefix` ("ref_") names a reference model's values."""
    first = items[0]
    if isinstance(first, PreferenceTokens):
        chosen, rejected = values_B.view(-1, 2).unbind(1)
        out = {"chosen": chosen, "rejected": rejected, "chosen_len": len_B[0::2], "rejected_len": len_B[1::2]}
    elif first.label is not None:
        labels = torch.tensor([it.label for it in items], device=values_B.device)  # type: ignore[union-attr]
        out = {"logps": values_B, "lengths": len_B, "labels": labels}
    else:
        k = len(first.completion_ids)
        if any(len(it.completion_ids) != k for it in items):  # type: ignore[union-attr]
            raise ValueError("listwise losses need the same number of completions in every row of a batch")
        scores = torch.tensor([it.scores for it in items], device=values_B.device)  # type: ignore[union-attr]
        out = {"logps_N_K": values_B.view(-1, k), "lengths_N_K": len_B.view(-1, k), "scores_N_K": scores}
        if k >= 2:  # the `win_rates` need: each completion's share of its list it outscores (SPPO)
            out["win_rates_N_K"] = win_rates_within_group(preference_matrix(scores))
    if prefix:
        return {
            f"{prefix}{key}": value for key, value in out.items() if key in ("chosen", "rejected", "logps", "logps_N_K")
        }
    return out


@torch.no_grad()
def logps_per_item(
    model: Any, items: list[Tokens], size: int, pad_id: int, device: torch.device, bf16: bool, *, shown: str = ""
) -> list[Tensor]:
    """Summed completion log-probs of every item (pairs: [chosen, rejected]), computed once; a progress bar
    named `shown` counts the batches (none when it is empty)."""
    out: list[Tensor] = []
    batches = -(-len(items) // size)
    for chunk in track(chunks(items, size), shown, total=batches, unit="batches", enabled=bool(shown)):
        out += per_item(
            sequence_logps(model, collate_feedback(chunk, pad_id=pad_id), device, bf16=bf16)[0].cpu(), chunk
        )
    return out


@torch.no_grad()
def kl_reference_point(
    model: Any,
    reference: Reference,
    items: list[Tokens],
    pad_id: int,
    device: torch.device,
    bf16: bool,
    ranks: Ranks = ONE_PROCESS,
) -> Tensor:
    """KTO's z0 (Ethayarajh et al. 2024, Sec. 4.1): mean log-ratio of mismatched prompt/completion
    pairs of the step, detached, clamped >= 0. Each prompt takes the previous example's completion (the
    first takes the last's), as TRL 1.16's KTOTrainer rotates completions by +1 (docs/preference.md, `kto`).
    Data-parallel, each rank pairs within its share (as TRL pairs within each device's batch) and the mean is
    over every rank's pairs."""
    shifted = [
        CompletionTokens(it.prompt_ids, items[i - 1].completion_ids, it.where)  # type: ignore[union-attr]
        for i, it in enumerate(items)
    ]
    batch = collate_completions(shifted, pad_id=pad_id)[0]
    logp_B = sequence_logps(model, batch, device, bf16=bf16)[0]
    with reference.active():
        ref_B = sequence_logps(reference.model, batch, device, bf16=bf16)[0]
    total, count = all_reduce_sum((logp_B - ref_B).sum(), ranks), all_reduce_sum(float(len(items)), ranks)
    return (total / count).clamp(min=0.0)


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

    def add(self, values: Tensor, ranks: Ranks = ONE_PROCESS) -> None:
        """Add a micro-batch's values, every rank's (data-parallel ranks keep the same running mean)."""
        self.total += float(all_reduce_sum(float(values.sum()), ranks))
        self.count += int(all_reduce_sum(float(values.numel()), ranks))

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
    return {f"eval_{k}": v / len(items) for k, v in totals.items()} | {"eval_pairs": float(len(items))}


@dataclass
class PreferenceStep:
    """What one preference update needs, read once from the config; `accumulate` runs it on a step's examples."""

    loss_fn: Callable[..., Any]
    loss_args: dict[str, Any]
    scale: float
    """The loss's beta (1 without one): implicit rewards are scale * log-ratio."""
    micro_batch: int
    pad_id: int
    device: torch.device
    bf16: bool
    length_normalize: bool
    shift: RunningMean = field(default_factory=RunningMean)
    ranks: Ranks = ONE_PROCESS

    @classmethod
    def of(
        cls,
        cfg: PrefConfig,
        pad_id: int,
        device: torch.device,
        history: list[dict[str, float]],
        ranks: Ranks = ONE_PROCESS,
    ) -> PreferenceStep:
        loss_fn = PREFERENCE_LOSSES[cfg.pref.loss]
        return cls(
            loss_fn, cfg.pref.loss_args, hyper_default(loss_fn, cfg.pref.loss_args, "beta") or 1.0,
            cfg.train.micro_batch_size or cfg.train.batch_size, pad_id, device, cfg.train.bf16,
            cfg.pref.length_normalize, RunningMean.from_history(history), ranks,
        )  # fmt: skip

    def accumulate(
        self,
        model: Any,
        reference: Reference | None,
        items: Sequence[Tokens],
        *,
        ref_logps: Sequence[Tensor] | None = None,
        per_example: dict[str, Tensor] | None = None,
    ) -> dict[str, float]:
        """Gradients of the mean loss over the step's examples, micro-batch by micro-batch (the sum over `items`,
        this rank's share, divided by the count over every rank, so neither micro-batching nor the number of ranks
        changes it). Reference log-probs come from `ref_logps` (one per item, computed once) when given, else from
        a forward of `reference`. `per_example`: tensors whose first axis is the items (which side of a pair the
        reference sampled). Returns sums over every rank's items, and the step-wide values the loss was given
        (KTO's reference point, BCO's shift)."""
        needs, count = self.loss_fn.needs, all_reduce_sum(float(len(items)), self.ranks)
        step_values: dict[str, Tensor] = {}
        if "kl_reference_point" in needs and items:
            step_values["kl_ref_point"] = kl_reference_point(model, reference, list(items), self.pad_id, self.device,
                                                             self.bf16, self.ranks)  # fmt: skip
        if "reward_shift" in needs:
            step_values["reward_shift"] = torch.tensor(self.shift.mean, device=self.device)
        totals: dict[str, float] = defaultdict(float, loss=0.0)
        for start in range(0, len(items), self.micro_batch):
            rows = slice(start, start + self.micro_batch)
            cached = ref_logps[rows] if ref_logps is not None else None
            inputs = preference_inputs(model, None if cached is not None else reference, list(items[rows]), cached,
                                       self.pad_id, self.device, self.bf16, self.length_normalize)  # fmt: skip
            inputs |= {key: value[rows].to(self.device) for key, value in (per_example or {}).items()}
            losses_N = call_with(self.loss_fn, {**inputs, **step_values}, self.loss_args)
            (losses_N.sum() / count).backward()
            totals["loss"] += float(losses_N.detach().sum())
            add_preference_metrics(totals, inputs, self.scale)
            if "reward_shift" in needs:
                self.shift.add(log_ratios(inputs), self.ranks)
        summed = {key: all_reduce_sum(value, self.ranks) for key, value in sorted(totals.items())}
        return summed | {key: float(value) for key, value in step_values.items()}

    def metrics(self, totals: dict[str, float], count: int) -> dict[str, float]:
        """Per-example means of `accumulate`'s sums, the step-wide values as they were, BCO's shift state."""
        step_wide = {"kl_ref_point", "reward_shift"}
        means = {k: v / max(1, count) for k, v in totals.items() if k not in step_wide}
        shift = self.shift.state() if "reward_shift" in self.loss_fn.needs else {}
        return means | {k: v for k, v in totals.items() if k in step_wide} | shift
