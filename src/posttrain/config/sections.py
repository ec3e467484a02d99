"""Config sections shared by every trainer. Every default runs on a laptop CPU.

Public contract (issue #3): `model.path`, `data.train`, `data.eval`, `output_dir`, `seed`,
`train.max_steps`, `train.lr` mean the same in every trainer.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class LoraSection(Section):
    r: PositiveInt = 8
    """LoRA rank."""
    alpha: PositiveInt = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: Fraction = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or peft's 'all-linear'."""


class ModelSection(Section):
    path: str | None = None
    """A local Hugging Face model directory. One of path and preset (or a model object passed from Python); an
    override of either replaces the recipe's other."""
    preset: str | None = None
    """Build a new, randomly initialised model of this preset (see `posttrain list presets`)."""
    tokenizer: str | None = None
    """A tokenizer directory, or a built-in tokenizer the project builds: a task's name (arithmetic, reverse, sort,
    count, sequence), arithmetic-tools, or characters (one token per character, the suite tasks'). Default:
    model.path's own."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    lora: LoraSection | None = None
    """Train a LoRA adapter (needs the `lora` extra) instead of all weights."""
    disable_dropout: bool = True
    """Set every dropout probability of the model to 0 (TRL's default): with dropout on, the policy's log-probs
    differ from the sampler's and the reference's even before any update. LoRA's own dropout is model.lora.dropout."""

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if self.path is not None and self.preset is not None:
            raise ValueError("set one of model.path (a local model directory) and model.preset, not both")
        if self.preset is not None and self.tokenizer is None:
            raise ValueError("model.preset needs model.tokenizer (a tokenizer directory or a task name)")
        return self


TaskName = Literal["arithmetic", "reverse", "sort", "count", "sequence"]
ARITHMETIC_ONLY = ("digits", "operators", "think_fraction", "tool_fraction")


class TaskSection(Section):
    name: TaskName = "arithmetic"
    """A built-in task: arithmetic (`37+58=` -> `95`), reverse (`rev abcd=` -> `dcba`), sort (`sort 3912=` ->
    `1239`), count (`count b in abbcab=` -> `3`) or sequence (`next 4,7,10,13=` -> `16`); `posttrain list tasks`."""
    digits: PositiveInt = 2
    """arithmetic: largest number of digits in an operand."""
    operators: str = "+-"
    """arithmetic: operators to draw from (any of +-*)."""
    train_size: PositiveInt = 20000
    """Training problems to generate (seeded by `seed`)."""
    eval_size: PositiveInt = 500
    """Held-out problems to generate; never overlap with training problems."""
    think_fraction: Fraction = 0.0
    """Share of demonstrations that work the problem out column by column in `<think>...</think>` before
    the answer (`37+58=` -> `<think>7+8=15;3+5+1=9</think>95`); the rest state the answer alone. + and - only."""

    tool_fraction: Fraction | None = None
    """null: text rows. A number: conversational rows for a calculator agent (`tools` column, the calculator's
    schema), this share of the demonstrations calling the calculator and answering with its result, the rest
    answering directly (docs/agents.md)."""
    wrong_fraction: Fraction = 0.0
    """Share of demonstrations that state a near miss instead of the answer (noisy demonstrations: `95` -> `96`,
    `dcba` -> `dcab`); the rows' `answer` column, which rewards and held-out accuracy read, stays right."""

    @model_validator(mode="after")
    def _working_is_written_for_plus_and_minus(self) -> TaskSection:
        if self.think_fraction > 0 and "*" in self.operators:
            raise ValueError("think_fraction > 0 needs operators from +- only (no worked form for *)")
        misplaced = [key for key in ARITHMETIC_ONLY if key in self.model_fields_set]
        if self.name != "arithmetic" and misplaced:
            raise ValueError(f"{', '.join(misplaced)}: settings of the arithmetic task, not of {self.name}")
        return self


class DataSection(Section):
    train: str | None = None
    """Training data: JSONL, JSON, Parquet or CSV file, or a saved `datasets` directory."""
    eval: str | None = None
    """Held-out data, same formats."""
    task: TaskSection | None = None
    """Generate train/eval rows from a built-in task instead of files."""
    on_bad_row: Literal["error", "skip"] = "error"
    """Stop at the first invalid row, or skip and count invalid rows."""
    max_length: PositiveInt = 512
    """Longest sequence in tokens (prompt + completion)."""
    truncation: Literal["truncate", "drop"] = "truncate"
    """What to do with longer rows; both are counted."""
    completion_only: bool = True
    """Loss on completion (assistant) tokens only; false trains on every token."""
    packing: bool = False
    """Pack several examples into one row (no padding compute); otherwise bucket by length."""



class TrainSection(Section):
    max_steps: PositiveInt = 200
    """Optimiser steps."""
    lr: PositiveFloat = 1e-3
    """Peak learning rate (AdamW)."""
    batch_size: PositiveInt = 32
    """Examples per optimiser step."""
    micro_batch_size: PositiveInt | None = None
    """Examples per forward/backward (memory bound only; never changes the result). Default: batch_size."""
    warmup_steps: NonNegativeInt = 10
    """Linear warm-up steps."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up."""
    min_lr_ratio: Fraction = 0.1
    """Final learning rate as a fraction of lr (cosine, linear)."""
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    """AdamW decoupled weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    max_grad_norm: PositiveFloat | None = 1.0
    """Clip the global gradient norm; null disables."""
    bf16: bool = False
    """bfloat16 autocast for forward/backward (master weights stay in model.dtype)."""
    eval_every: NonNegativeInt = 0
    """Evaluate every N steps (0: only at the end)."""
    save_every: NonNegativeInt = 0
    """Checkpoint every N steps (0: only at the end)."""
    keep_last: PositiveInt = 2
    """Checkpoints to keep."""
    log_every: PositiveInt = 1
    """Log metrics every N steps."""
    max_bad_steps: PositiveInt = 5
    """An optimiser update whose loss or gradient norm is NaN/inf is skipped (counted as skipped_steps);
    this many in a row stop the run, keeping the checkpoints already written."""


class EvalSection(Section):
    max_new_tokens: PositiveInt = 16
    """Tokens to generate per answer."""
    samples: PositiveInt = 1
    """Sampled completions per prompt for pass@k (1: greedy accuracy only)."""
    k: PositiveInt = 1
    """k of pass@k (at most samples)."""
    temperature: PositiveFloat = 1.0
    """Sampling temperature for pass@k."""
    batch_size: PositiveInt = 64
    """Prompts per generation batch."""
    limit: PositiveInt | None = None
    """Evaluate at most this many rows."""
    reward: str = "numeric_match"
    """Reward that decides correctness (score >= 1): a built-in name or module:function. Left out beside data.task,
    the task's verifier (exact_match for reverse and sort)."""

    @model_validator(mode="after")
    def _k_within_samples(self) -> EvalSection:
        if self.k > self.samples:
            raise ValueError(f"eval.k={self.k} needs eval.samples >= k (got {self.samples})")
        return self


class RunSection(Section):
    """Fields every trainer config has at its top level."""

    output_dir: str = "runs/default"
    """Run directory: checkpoints, metrics.jsonl, tensorboard/, final model."""
    seed: int = 0
    """Seed for data order, initialisation and sampling."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    recipe_dir: str | None = Field(default=None, exclude=True)
    """Set by the loader: the recipe's directory, for relative paths in it."""
    load_notes: tuple[str, ...] = Field(default=(), exclude=True)
    """Set by the loader: what an override replaced in the recipe (`config.loading.REPLACES`); runs print it."""

    @model_validator(mode="before")
    @classmethod
    def _task_verifier_judges_by_default(cls, raw: Any) -> Any:
        verifier = task_verifier(raw)
        evaluation = raw.get("eval", {}) if isinstance(raw, dict) else None
        if verifier is None or "eval" not in cls.model_fields or not isinstance(evaluation, dict):
            return raw
        return raw if "reward" in evaluation else {**raw, "eval": {**evaluation, "reward": verifier}}


def task_verifier(raw: Any) -> str | None:
    """The verifier of the built-in task a raw config's data.task names, when it is not numeric_match (the default
    of eval.reward and of RL's rewards); None otherwise."""
    from posttrain.tasks import TASKS

    data = raw.get("data") if isinstance(raw, dict) else None
    task = data.get("task") if isinstance(data, dict) else None
    name = task.get("name") if isinstance(task, dict) else None
    if not isinstance(name, str) or name not in TASKS or TASKS[name].verifier == "numeric_match":
        return None
    return TASKS[name].verifier
