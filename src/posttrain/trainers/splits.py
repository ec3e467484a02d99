"""The splits a run trains and evaluates on: rows passed from Python, a file (data.train, data.eval) or a built-in
task (data.task), in that order, validated and encoded for the trainer's data kind.

A task beside a training file gives the held-out rows only (`data_sources` says so in a run's first lines).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from posttrain.config.loading import ConfigError
from posttrain.config.pref import FeedbackDataSection
from posttrain.config.sections import DataSection, TaskSection
from posttrain.data import (
    LoadReport,
    encode_listwise,
    encode_preference,
    encode_prompts,
    encode_unpaired,
    validate_rows,
)
from posttrain.data.encoding import CompletionTokens, PreferenceTokens, PromptTokens
from posttrain.data.errors import DataError
from posttrain.data.examples import Kind, load_examples
from posttrain.data.readers import Row, gc_paused, iter_rows
from posttrain.data.stepwise import StepwiseTokens, encode_stepwise
from posttrain.tasks import TASKS, ArithmeticTask, GuessNumberTask
from posttrain.tasks.preference_data import FeedbackKind, feedback_rows
from posttrain.tasks.process_data import stepwise_rows
from posttrain.trainers.build import resolve_path

Rows = Sequence[dict[str, Any]] | Any  # a list of dicts or a `datasets.Dataset`
Tokens = PreferenceTokens | CompletionTokens | StepwiseTokens
ENCODERS = {"preference": encode_preference, "unpaired": encode_unpaired, "listwise": encode_listwise,
            "stepwise": encode_stepwise}  # fmt: skip


def build_task(section: TaskSection) -> ArithmeticTask | GuessNumberTask:
    """The task a config's `data.task` names, with the settings it takes."""
    task = TASKS[section.name]
    takes = {f.name for f in dataclasses.fields(task)}
    return task(**{key: value for key, value in section.model_dump().items() if key in takes})


def rows_from_memory(rows: Rows, source: str) -> list[Row]:
    """Rows handed over from Python (a list of dicts or a datasets.Dataset), named for error messages."""
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(
                f"{source} row {i + 1}: expected a mapping of field names to values, got {type(row).__name__}"
            )
        out.append(Row(fields=dict(row), where=f"{source} row {i + 1}"))
    if not out:
        raise DataError(f"{source}: the dataset is empty (no rows)", reason="empty dataset")
    return out


def load_split(
    section: DataSection,
    kind: Kind,
    split: str,
    *,
    seed: int,
    recipe_dir: str | None,
    rows: Rows | None = None,
) -> tuple[Sequence[Any], LoadReport] | None:
    """Examples of one split ("train" or "eval") from Python rows, a file, or a built-in task; None for an absent
    eval split (an absent train split is a ConfigError)."""
    report = LoadReport()
    if rows is not None:
        report.source = f"{split} rows"
        memory_rows = rows_from_memory(rows, report.source)
        report.rows = len(memory_rows)
        return validate_rows(memory_rows, kind, on_bad_row=section.on_bad_row, report=report), report
    path = section.train if split == "train" else section.eval
    if path is not None:
        return load_examples(resolve_path(path, recipe_dir), kind, on_bad_row=section.on_bad_row)
    if section.task is None:
        return require_train_data(split)
    task = build_task(section.task)
    size = section.task.train_size if split == "train" else section.task.eval_size
    generated = task.sample(size, seed=seed, split=split)
    report.source = f"task {section.task.name} ({split})"
    report.rows = len(generated)
    memory_rows = [Row(fields=r, where=f"{report.source} row {i + 1}") for i, r in enumerate(generated)]
    return validate_rows(memory_rows, kind, on_bad_row=section.on_bad_row, report=report), report


def require_train_data(split: str) -> None:
    """None for an absent held-out split; a training split must come from somewhere."""
    if split == "train":
        raise ConfigError("data: set data.train (a file or datasets directory) or data.task, or pass train= rows "
                          "from Python")  # fmt: skip


def load_prompts(
    section: DataSection,
    tokenizer: Any,
    split: str,
    *,
    seed: int,
    recipe_dir: str | None,
    rows: Rows | None = None,
    limit: int | None = None,
    max_length: int | None = None,
) -> tuple[list[PromptTokens], LoadReport | None]:
    """The encoded prompts of one split, the first `limit` of them (eval split only), with their load report;
    ([], None) when the split has no data. `max_length` defaults to data.max_length."""
    loaded = load_split(section, "prompt", split, seed=seed, recipe_dir=recipe_dir, rows=rows)
    if loaded is None:
        return [], None
    examples, report = loaded
    if split == "eval" and limit is not None:
        examples = examples[:limit]
    encoded = encode_prompts(
        examples, tokenizer, max_length=max_length or section.max_length, truncation=section.truncation, report=report
    )
    return encoded, report


@dataclass
class FeedbackSplit:
    """Encoded examples of one split, with the rows they came from (by `where`) and eval prompts."""

    tokens: list[Tokens]
    report: LoadReport
    margins: dict[str, Any] = field(default_factory=dict)
    """The rows' `margin` column (reward models' margin), by `where`."""
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
    max_prompt_length: int | None = None,
    encode_args: dict[str, Any] | None = None,
) -> FeedbackSplit | None:
    """Rows (Python, a file or data.task) -> validated examples of `kind` -> tokens; None if absent. A prompt longer
    than `max_prompt_length` keeps its last tokens (pref.max_prompt_length). `encode_args`: more keyword arguments
    of the kind's encoder (stepwise rows: the step separator)."""
    report = LoadReport()
    path = data.train if split == "train" else data.eval
    if rows is not None:
        raw = rows_from_memory(rows, f"{split} rows")
    elif path is not None:
        raw = iter_rows(resolve_path(path, recipe_dir), on_bad_row=data.on_bad_row, report=report)
    elif data.task is not None:
        task, size = build_task(data.task), data.task.train_size if split == "train" else data.task.eval_size
        if kind == "stepwise" and not isinstance(task, ArithmeticTask):
            raise ConfigError(f"data.task: stepwise rows come from the arithmetic task's worked steps, not from "
                              f"{data.task.name}")  # fmt: skip
        if not hasattr(task, "wrong_answer"):
            raise ConfigError(f"data.task: the {data.task.name} task gives demonstrations and prompts (sft, rl); "
                              f"{kind} rows are generated from the tasks with answers to get wrong only")  # fmt: skip
        if kind == "stepwise":
            generated = stepwise_rows(task, size, seed=seed, split=split, wrong_fraction=data.task.wrong_step_fraction)
        else:
            generated = feedback_rows(task, size, seed=seed, split=split, kind=kind,  # type: ignore[arg-type]
                                      rejected=data.task.rejected)  # fmt: skip
        raw = [Row(fields=r, where=f"task {data.task.name} ({split}) row {i + 1}") for i, r in enumerate(generated)]
    else:
        return require_train_data(split)
    margins: dict[str, Any] = {}
    answered: list[Row] = []
    with gc_paused():
        examples = validate_rows(_noting(raw, margins, answered if split == "eval" else None), kind,
                                 on_bad_row=data.on_bad_row, report=report)  # fmt: skip
    if isinstance(raw, list):
        report.rows = report.rows or len(raw)
    fit = dict(max_length=data.max_length, truncation=data.truncation, on_bad_row=data.on_bad_row)
    tokens = ENCODERS[kind](examples, tokenizer, **fit, **(encode_args or {}), report=report,
                            max_prompt_length=max_prompt_length)  # fmt: skip
    prompts = (
        encode_prompts(validate_rows(answered, "prompt", on_bad_row="skip"), tokenizer, max_length=data.max_length)
        if answered
        else []
    )
    return FeedbackSplit(tokens, report, margins, prompts)


def _noting(rows: Iterable[Row], margins: dict[str, Any], answered: list[Row] | None) -> Iterator[Row]:
    """`rows` as they are read, noting each row's `margin` column (by `where`) and, for held-out rows, the rows
    with an answer to score (their prompts are evaluated): the file's rows are never all held at once."""
    for row in rows:
        if "margin" in row.fields:
            margins[row.where] = row.fields["margin"]
        if answered is not None and "answer" in row.fields and "prompt" in row.fields:
            answered.append(row)
        yield row


def data_sources(data: Any, train_rows: bool, eval_rows: bool) -> str:
    """Where a run's rows come from, in the order the loaders look (rows passed from Python, data.train or
    data.eval, data.task): a task beside a training file gives the held-out rows only, which this says."""
    task = f"data.task ({data.task.name}, generated)" if data.task is not None else None
    train = "rows passed from Python" if train_rows else data.train or task
    held_out = "rows passed from Python" if eval_rows else data.eval or task
    line = f"data: training rows from {train or 'nowhere'}; held-out rows from {held_out or 'none'}"
    if task is not None and held_out == task and train != task:
        line += " (data.eval is not set)"
    return line


def scorable_prompts(
    prompts: list[PromptTokens], required: dict[str, list[str]], *, on_bad_row: str, report: LoadReport | None
) -> list[PromptTokens]:
    """The prompts whose rows hold every column a reward reads (`RewardSet.required_columns`). A row without one
    would be scored as not applicable by that reward, 0 in the total, and pushed down by its advantage: it raises
    DataError naming the row, the column and the rewards, or with data.on_bad_row: skip is left out and counted
    ("missing reward column"). A column present with the value None stays: not applicable by design (a verifier
    for rows that have no gold answer, beside another reward that scores them)."""
    kept = []
    for prompt in prompts:
        missing = [column for column in required if column not in prompt.extra]
        if not missing:
            kept.append(prompt)
            continue
        if on_bad_row != "skip":
            readers = ", ".join(required[missing[0]])
            raise DataError(
                f"{prompt.where}: no field {missing[0]!r}, which the reward {readers} reads; add it to every row, "
                "or set data.on_bad_row: skip to leave such rows out",
                reason="missing reward column",
            )
        if report is not None:
            report.skipped["missing reward column"] += 1
    if prompts and not kept:
        raise DataError(f"no training prompt holds the columns the rewards read ({', '.join(required)})",
                        reason="missing reward column")  # fmt: skip
    return kept
