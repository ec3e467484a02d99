"""Parts the offline trainers (`preference.py`, `reward_model.py`) and the online preference loop share:
feedback data by kind, one forward for every completion of a batch, and calling an objective with the
inputs its signature names.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from posttrain.config.pref import FeedbackDataSection
from posttrain.data import (
    CompletionTokens,
    LoadReport,
    PreferenceTokens,
    TokenBatch,
    collate_completions,
    collate_preference,
    encode_listwise,
    encode_preference,
    encode_prompts,
    encode_unpaired,
    read_rows,
    validate_rows,
)
from posttrain.data.readers import Row
from posttrain.objectives.pairing import preference_matrix, win_rates_within_group
from posttrain.policies import token_logprobs
from posttrain.tasks.preference_data import FeedbackKind, feedback_rows
from posttrain.trainers.build import Rows, build_task, chunks, resolve_path, rows_from_memory

Tokens = PreferenceTokens | CompletionTokens
ENCODERS = {"preference": encode_preference, "unpaired": encode_unpaired, "listwise": encode_listwise}


def hyper_default(fn: Callable[..., Any], hyper: dict[str, Any], name: str) -> Any:
    """A hyper-parameter's value: the recipe's, else the function's default; None if it has none."""
    if name in hyper:
        return hyper[name]
    parameter = inspect.signature(fn).parameters.get(name)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


@dataclass
class FeedbackSplit:
    """Encoded examples of one split, with the rows they came from (by `where`) and eval prompts."""

    tokens: list[Tokens]
    report: LoadReport
    fields: dict[str, dict[str, Any]] = field(default_factory=dict)
    answer_prompts: list[Any] = field(default_factory=list)


def load_feedback(
    data: FeedbackDataSection,
    kind: FeedbackKind,
    split: str,
    tokenizer: Any,
    *,
    seed: int,
    recipe_dir: str | None,
    rows: Rows | None = None,
) -> FeedbackSplit | None:
    """Rows (Python, a file or data.task) -> validated examples of `kind` -> tokens; None if absent."""
    report = LoadReport()
    path = data.train if split == "train" else data.eval
    if rows is not None:
        raw = rows_from_memory(rows, f"{split} rows")
    elif path is not None:
        raw = read_rows(resolve_path(path, recipe_dir), on_bad_row=data.on_bad_row, report=report)
    elif data.task is not None:
        task, size = build_task(data.task), data.task.train_size if split == "train" else data.task.eval_size
        generated = feedback_rows(task, size, seed=seed, split=split, kind=kind)  # type: ignore[arg-type]
        raw = [Row(fields=r, where=f"task {data.task.name} ({split}) row {i + 1}") for i, r in enumerate(generated)]
    else:
        return None
    report.rows = report.rows or len(raw)
    examples = validate_rows(raw, kind, on_bad_row=data.on_bad_row, report=report)
    fit = dict(max_length=data.max_length, truncation=data.truncation, on_bad_row=data.on_bad_row)
    tokens = ENCODERS[kind](examples, tokenizer, **fit, report=report)
    answered = [r for r in raw if "answer" in r.fields and "prompt" in r.fields]
    prompts = (
        encode_prompts(validate_rows(answered, "prompt", on_bad_row="skip"), tokenizer, max_length=data.max_length)
        if split == "eval"
        else []
    )
    return FeedbackSplit(tokens, report, {r.where: r.fields for r in raw}, prompts)


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
    model: Any, items: list[Tokens], size: int, pad_id: int, device: torch.device, bf16: bool
) -> list[Tensor]:
    """Summed completion log-probs of every item (pairs: [chosen, rejected]), computed once."""
    out: list[Tensor] = []
    for chunk in chunks(items, size):
        out += per_item(
            sequence_logps(model, collate_feedback(chunk, pad_id=pad_id), device, bf16=bf16)[0].cpu(), chunk
        )
    return out


@torch.no_grad()
def kl_reference_point(
    model: Any, reference: Any, items: list[Tokens], pad_id: int, device: torch.device, bf16: bool
) -> Tensor:
    """KTO's z0 (Ethayarajh et al. 2024, Sec. 4.1): mean log-ratio of mismatched prompt/completion
    pairs of the step (each prompt with the next example's completion), detached, clamped >= 0."""
    shifted = [
        CompletionTokens(it.prompt_ids, items[(i + 1) % len(items)].completion_ids, it.where)  # type: ignore[union-attr]
        for i, it in enumerate(items)
    ]
    batch = collate_completions(shifted, pad_id=pad_id)[0]
    logp_B = sequence_logps(model, batch, device, bf16=bf16)[0]
    ref_B = sequence_logps(reference, batch, device, bf16=bf16)[0]
    return (logp_B - ref_B).mean().clamp(min=0.0)
