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
    chat_template: str | None = None
    """A chat template replacing the tokenizer's own (TRL's chat_template_path): the Jinja text itself, or a file
    holding it (relative to the working directory, else to the recipe). Conversational rows are rendered with it,
    and final/ saves it with the tokenizer."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    lora: LoraSection | None = None
    """Train a LoRA adapter (needs the `lora` extra) instead of all weights."""
    quantization: Literal["4bit", "8bit"] | None = None
    """Load model.path's weights quantized through bitsandbytes (the `quantization` extra; a CUDA GPU): 4bit is
    QLoRA's NF4 with double quantisation and bfloat16 compute (Dettmers et al. 2023, arXiv:2305.14314), 8bit is
    LLM.int8() (arXiv:2208.07339). The quantized weights stay frozen, so it needs model.lora."""
    disable_dropout: bool = True
    """Set every dropout probability of the model to 0 (TRL's default): with dropout on, the policy's log-probs
    differ from the sampler's and the reference's even before any update. LoRA's own dropout is model.lora.dropout."""

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if self.path is not None and self.preset is not None:
            raise ValueError("set one of model.path (a local model directory) and model.preset, not both")
        if self.preset is not None and self.tokenizer is None:
            raise ValueError("model.preset needs model.tokenizer (a tokenizer directory or a task name)")
        if self.quantization is not None and (self.path is None or self.lora is None):
            raise ValueError(f"model.quantization: {self.quantization} loads model.path's weights frozen, for a LoRA "
                             "adapter to train: set model.path and model.lora (e.g. model.lora.r=16)")  # fmt: skip
        return self


TaskName = Literal["arithmetic", "guess_number", "reverse", "sort", "count", "sequence"]
ARITHMETIC_FIELDS = ("digits", "operators", "think_fraction", "tool_fraction")
GUESS_NUMBER_FIELDS = ("low", "high", "max_guesses", "search_fraction")
TASK_FIELDS = {"arithmetic": (*ARITHMETIC_FIELDS, "wrong_fraction"), "guess_number": GUESS_NUMBER_FIELDS}
"""The settings only some tasks take; the suite's tasks (reverse, sort, count, sequence) take `wrong_fraction`."""


class TaskSection(Section):
    name: TaskName = "arithmetic"
    """A built-in task: arithmetic (`37+58=` -> `95`), guess-the-number games (`tasks/guess_number.py`), reverse
    (`rev abcd=` -> `dcba`), sort (`sort 3912=` -> `1239`), count (`count b in abbcab=` -> `3`) or sequence
    (`next 4,7,10,13=` -> `16`); `posttrain list tasks`."""
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

    low: int = 1
    """guess_number: the smallest secret."""
    high: int = 16
    """guess_number: the largest secret."""
    max_guesses: PositiveInt = 5
    """guess_number: guesses a game allows (the environment's `max_guesses` must match)."""
    search_fraction: Fraction = 1.0
    """guess_number: share of demonstrations that play binary search; the rest count up from the lowest number still
    possible."""

    @model_validator(mode="after")
    def _fields_of_the_task(self) -> TaskSection:
        specific = {key for fields in TASK_FIELDS.values() for key in fields}
        own = TASK_FIELDS.get(self.name, ("wrong_fraction",))
        stray = sorted((specific - set(own)) & self.model_fields_set)
        if stray:
            raise ValueError(f"{', '.join(stray)}: not a setting of the {self.name} task")
        if self.low > self.high:
            raise ValueError(f"low={self.low} is above high={self.high}")
        return self

    @model_validator(mode="after")
    def _working_is_written_for_plus_and_minus(self) -> TaskSection:
        if self.think_fraction > 0 and "*" in self.operators:
            raise ValueError("think_fraction > 0 needs operators from +- only (no worked form for *)")
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
    """Optimiser steps. Or train.epochs (setting one replaces the recipe's other)."""
    lr: PositiveFloat = 1e-3
    """Peak learning rate (AdamW)."""
    epochs: PositiveFloat | None = None
    """Passes over the training data instead of max_steps (TRL's num_train_epochs), over the rows that loading kept:
    max_steps = ceil(epochs * examples / batch_size) for sft, pref and rm; ceil(epochs * prompts / prompts_per_step)
    for rl (rl.epochs is another thing: passes over each step's rollouts); ceil(epochs * prompts / prompts_per_round)
    rounds of steps_per_round steps for online pref. A run's first lines say the steps it makes."""
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
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Data parallelism over ranks (`--nproc`, torchrun): ddp keeps the whole model on every rank and sums the
    gradients; fsdp shards parameters, gradients and optimiser state over the ranks (FSDP2, `fully_shard`), for a
    model that does not fit one device; its checkpoints (torch.distributed.checkpoint) resume on any number of
    ranks. SFT, offline preference and reward models (docs/distributed.md)."""
    max_bad_steps: PositiveInt = 5
    """An optimiser update whose loss or gradient norm is NaN/inf is skipped (counted as skipped_steps);
    this many in a row stop the run, keeping the checkpoints already written."""

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainSection:
        if self.epochs is not None and "max_steps" in self.model_fields_set:
            raise ValueError(f"set one of train.max_steps ({self.max_steps}) and train.epochs ({self.epochs}), not "
                             "both")
        return self


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


class LogSection(Section):
    """Where a run's metrics go besides metrics.jsonl, which is always written (`runtime.trackers`)."""

    to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = ["tensorboard"]
    """Experiment trackers to log to: any of tensorboard, wandb, mlflow, trackio (each in its own extra: pip install
    'posttrain[wandb]'). The default TensorBoard is used when installed; a tracker named here that is not installed
    stops the run at its start. Each tracker's own settings choose its offline or local mode (WANDB_MODE=offline,
    MLFLOW_TRACKING_URI, TRACKIO_DIR)."""
    project: str = "posttrain"
    """The wandb and trackio project, and the MLflow experiment."""
    run_name: str | None = None
    """The run's name in the trackers; default: output_dir's last part."""
    samples_every: NonNegativeInt = 10
    """Online trainers (rl, pref with online:): log sampled completions with their prompts and each reward's score to
    samples.jsonl and the trackers' tables at step 1 and every this many steps; 0: never."""
    samples_per_step: PositiveInt = 16
    """Most completions logged per logged step (whole groups first: the first prompts' completions)."""


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
