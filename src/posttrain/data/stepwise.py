"""Stepwise rows -> token ids with each step's label at its last token, as a process reward model reads them.

A row's sequence is `prompt_ids` (as `encode_prompt` gives the generator), then each step tokenised alone without
special tokens and followed by the separator's ids (TRL's stepwise supervision format and its former PRMTrainer):

    37+58=  <think>7+8=15  ;  3+5+1=9</think>95  ;          separator ";": labels at the two ";" tokens

A step's label sits at its last token, the separator's last one (the step's own last token when the separator is
empty). Truncation keeps the prompt whole and the steps that end within `max_length`; a row left with no whole step
is dropped (counted). `split_steps` cuts a sampled completion's text into steps the same way, so that a PRM scores
the policy's steps in the format it was trained on (`rewards/process.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from posttrain.data.encoding import encode_prompt, tokenize_text
from posttrain.data.examples import StepwiseExample
from posttrain.data.report import LoadReport


@dataclass(frozen=True, slots=True)
class StepwiseTokens:
    """One stepwise row: `prompt_ids + completion_ids`, the steps' last tokens and their labels."""

    prompt_ids: list[int]
    completion_ids: list[int]
    step_ends: list[int]
    """Index in `completion_ids` of each labelled step's last token."""
    labels: list[bool]
    where: str


def encode_steps(tokenizer: Any, steps: Sequence[str], separator: str) -> tuple[list[int], list[int]]:
    """The ids of the steps, each followed by the separator, and the index of each step's last token."""
    separator_ids = tokenize_text(tokenizer, separator, add_special_tokens=False) if separator else []
    ids: list[int] = []
    ends: list[int] = []
    for step in steps:
        ids += tokenize_text(tokenizer, step, add_special_tokens=False) + separator_ids
        ends.append(len(ids) - 1)
    return ids, ends


def encode_stepwise(
    examples: Sequence[StepwiseExample],
    tokenizer: Any,
    *,
    separator: str,
    max_length: int | None = None,
    truncation: str = "truncate",
    on_bad_row: str = "error",
    last_step_only: bool = False,
    report: LoadReport | None = None,
    max_prompt_length: int | None = None,
) -> list[StepwiseTokens]:
    """Encode stepwise rows (module docstring), fitted to `max_length` (counted in `report`). `last_step_only`
    keeps the last step's label only (TRL's train_on_last_step_only: an outcome label at the trace's end). A prompt
    longer than `max_prompt_length` keeps its last tokens, as the other encoders keep them.
    `on_bad_row` is taken for the same arguments as the other encoders; no encoded stepwise row is bad."""
    report = report if report is not None else LoadReport()
    encoded = []
    for example in examples:
        prompt_ids = encode_prompt(tokenizer, example.prompt, where=example.where, max_length=max_prompt_length,
                                   from_end=True)  # fmt: skip
        prompt_cut = max_prompt_length is not None and len(prompt_ids) > max_prompt_length
        if prompt_cut:
            prompt_ids = prompt_ids[-max_prompt_length:]
        ids, ends = encode_steps(tokenizer, example.steps, separator)
        labels = list(example.labels)
        room = None if max_length is None else max_length - len(prompt_ids)
        if room is not None and len(ids) > room:
            kept = sum(end < room for end in ends)
            if truncation == "drop" or kept == 0:
                report.dropped += 1
                continue
            report.truncated += 1
            ids, ends, labels = ids[: ends[kept - 1] + 1], ends[:kept], labels[:kept]
        elif prompt_cut:
            report.truncated += 1
        if last_step_only:
            ends, labels = ends[-1:], labels[-1:]
        encoded.append(StepwiseTokens(prompt_ids, ids, ends, labels, example.where))
    return encoded


@dataclass(frozen=True)
class StepwiseBatch:
    """Right-padded rows of stepwise tokens; `step_at_B_T` marks the labelled positions, `labels_S` their labels in
    row-major order."""

    input_ids_B_T: Tensor
    attention_mask_B_T: Tensor
    step_at_B_T: Tensor
    labels_S: Tensor


def collate_stepwise(items: Sequence[StepwiseTokens], *, pad_id: int) -> StepwiseBatch:
    width = max(len(it.prompt_ids) + len(it.completion_ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    real = torch.zeros((len(items), width), dtype=torch.bool)
    step_at = torch.zeros((len(items), width), dtype=torch.bool)
    labels = []
    for row, it in enumerate(items):
        sequence = it.prompt_ids + it.completion_ids
        ids[row, : len(sequence)] = torch.tensor(sequence)
        real[row, : len(sequence)] = True
        step_at[row, [len(it.prompt_ids) + end for end in it.step_ends]] = True
        labels += it.labels  # the ends are increasing, so row-major order is the items' order
    return StepwiseBatch(ids, real, step_at, torch.tensor(labels, dtype=torch.bool))


def split_steps(text: str, separator: str) -> list[str]:
    """A sampled completion's text split into the steps a PRM scores: the parts between separators (empty parts
    dropped), the last part a step even without a separator after it."""
    if not separator:
        return [text] if text.strip() else []
    return [part for part in text.split(separator) if part.strip()]
