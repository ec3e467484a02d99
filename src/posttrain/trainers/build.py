"""Builder functions shared by the trainers: each turns one config section into a built part.

Trainers call these once, before their loop; the loops never build anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.config.loading import ConfigError
from posttrain.config.sections import DataSection, ModelSection, TaskSection, TrainSection
from posttrain.data.encoding import PromptTokens, encode_prompts
from posttrain.data.errors import DataError
from posttrain.data.examples import Kind, load_examples, validate_rows
from posttrain.data.readers import Row
from posttrain.data.report import LoadReport
from posttrain.policies import (
    Reference,
    apply_lora,
    build_model,
    build_reference,
    cpu_matmul,
    disable_dropout,
    is_lora,
    load_adapter_weights,
    load_model,
    load_tokenizer,
    save_pretrained,
)
from posttrain.policies.models import check_model_directory, enable_gradient_checkpointing
from posttrain.rollout.decoders import cuda_graphs_enabled
from posttrain.runtime.checkpoint import model_dir
from posttrain.runtime.model_files import holds_tokenizer
from posttrain.runtime.optim import build_adamw, build_scheduler
from posttrain.tasks import TASKS, ArithmeticTask, build_tokenizer

Rows = Sequence[dict[str, Any]] | Any  # a list of dicts or a `datasets.Dataset`


def build_task(section: TaskSection) -> ArithmeticTask:
    return TASKS[section.name](
        digits=section.digits, operators=section.operators, think_fraction=section.think_fraction
    )


def build_builtin_tokenizer(name: str) -> Any:
    """The tokenizer of a built-in task. Its corpus is fixed, so the vocabulary is the same every time."""
    if name not in TASKS:
        return None
    return build_tokenizer(ArithmeticTask(digits=3, operators="+-*").corpus())


def build_tokenizer_for(section: ModelSection, recipe_dir: str | None, model: Any = None) -> Any:
    """The tokenizer of model.tokenizer (a built-in name or a directory), else of model.path, else of the directory
    a model object passed in was loaded from. model.path is checked first, so that a wrong path is reported as
    model.path, before any tokenizer error."""
    if section.path is not None and model is None:
        check_model_directory(resolve_path(section.path, recipe_dir))
    source = section.tokenizer or (section.path if model is None else None)
    if source is None and model is not None:
        loaded_from = getattr(model, "name_or_path", None)
        if loaded_from and Path(loaded_from).is_dir() and holds_tokenizer(loaded_from):
            return load_tokenizer(loaded_from, "model.tokenizer")
        raise ConfigError(
            "a model object was passed without tokenizer=, and neither model.tokenizer nor the directory the model "
            f"was loaded from ({loaded_from or 'none'}) holds a tokenizer: pass tokenizer= too, or set model.tokenizer"
        )
    builtin = build_builtin_tokenizer(source)
    key = "model.tokenizer" if section.tokenizer else "model.path"
    return builtin if builtin is not None else load_tokenizer(resolve_path(source, recipe_dir), key)


def build_policy(
    section: ModelSection,
    *,
    seed: int,
    device: torch.device,
    recipe_dir: str | None,
    model: Any = None,
    tokenizer: Any = None,
    run_dir: Path | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) to train: the objects passed in (an object passed in is the object trained), else built
    from model.path or model.preset; then dropout off (model.disable_dropout), activation checkpointing and a LoRA
    adapter (model.lora) applied. A LoRA adapter's base must be a local directory for the saved adapter to load on
    it: a preset's, or an object's not loaded from one, is saved to `run_dir`/base first."""
    if model is None and section.path is None and section.preset is None:
        raise ConfigError("model: set model.path (a local model directory) or model.preset, or pass model= from Python")
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer_for(section, recipe_dir, model)
    if model is not None:
        model = model.to(device)
    elif section.path is not None:
        model = load_model(resolve_path(section.path, recipe_dir), dtype=section.dtype, device=device)
    else:
        model = build_model(section.preset, tokenizer, seed=seed, dtype=section.dtype).to(device)
    if section.disable_dropout:
        disable_dropout(model)
    if section.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if section.lora is not None and not is_lora(model):
        lora = section.lora
        base = adapter_base(model, tokenizer, run_dir)
        model = apply_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                           target_modules=lora.target_modules, base_path=base)  # fmt: skip
    return model, tokenizer


BASE_MODEL_DIR = "base"
"""Where a LoRA run saves its base model when that is not a local directory already (a preset)."""


def adapter_base(model: Any, tokenizer: Any, run_dir: Path | None) -> Path | None:
    """The local directory of `model`'s weights as they are now, for a LoRA adapter's config: the directory it was
    loaded from, else `run_dir`/base, written once (a resumed run finds it there)."""
    loaded_from = getattr(model, "name_or_path", None)
    if loaded_from and (Path(loaded_from) / "config.json").is_file():
        return Path(loaded_from)
    if run_dir is None:
        return None
    base = run_dir / BASE_MODEL_DIR
    if not (base / "config.json").is_file():
        save_pretrained(model, tokenizer, base)
    return base


def policy_and_reference(
    section: ModelSection,
    model: Any,
    tokenizer: Any,
    checkpoint: Path | None,
    *,
    needs_reference: bool,
    seed: int,
    device: torch.device,
    recipe_dir: str | None,
    run_dir: Path | None = None,
) -> tuple[Any, Any, Reference | None]:
    """(policy, tokenizer, reference or None): the policy built as `build_policy` does, its reference (the initial
    policy, frozen: `policies.build_reference`) when `needs_reference`, then on a resume the checkpoint's weights
    (all of them, or a LoRA policy's adapter) loaded into the policy."""
    model, tokenizer = build_policy(section, seed=seed, device=device, recipe_dir=recipe_dir, model=model,
                                    tokenizer=tokenizer, run_dir=run_dir)  # fmt: skip
    reference = build_reference(model) if needs_reference else None
    if checkpoint is not None:
        load_checkpoint_weights(model, checkpoint)
    return model, tokenizer, reference


def load_checkpoint_weights(model: Any, checkpoint: Path) -> None:
    """Copy the weights a checkpoint saved into `model`, in place: every weight, or a LoRA model's adapter."""
    if is_lora(model):
        load_adapter_weights(model, model_dir(checkpoint))
        return
    saved = type(model).from_pretrained(model_dir(checkpoint), local_files_only=True)
    model.load_state_dict(saved.state_dict())


def resolve_path(path: str | Path, recipe_dir: str | None) -> Path:
    """Paths in a recipe are relative to the working directory, else to the recipe's directory."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists() or recipe_dir is None:
        return candidate
    beside_recipe = Path(recipe_dir) / candidate
    return beside_recipe if beside_recipe.exists() else candidate


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
) -> tuple[list[Any], LoadReport] | None:
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


def check_environment() -> None:
    """Check the environment variables a run reads later, so that a misspelt one stops it before anything is
    built, rather than where it is first read, or never: POSTTRAIN_CPU_MATMUL (read at the first product large
    enough for oneDNN) and POSTTRAIN_CUDA_GRAPHS (read when a CUDA model builds its decoder). Every run calls it
    first (`run_state.start_run`, evaluation). It also caps oneDNN's kernel caches (`cpu_matmul.bound_kernel_caches`)
    before any product builds a kernel: a bfloat16 model on CPU runs all its products through oneDNN."""
    cpu_matmul.kernel_choice()
    cpu_matmul.bound_kernel_caches()
    cuda_graphs_enabled()


@dataclass
class Optimisation:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def build_optimisation(model: torch.nn.Module, section: TrainSection) -> Optimisation:
    optimizer = build_adamw(
        model.parameters(), lr=section.lr, weight_decay=section.weight_decay, betas=section.adam_betas
    )
    scheduler = build_scheduler(
        optimizer,
        warmup_steps=section.warmup_steps,
        total_steps=section.max_steps,
        schedule=section.schedule,
        min_ratio=section.min_lr_ratio,
    )
    return Optimisation(optimizer, scheduler)


class EpochSampler:
    """Endless seeded epochs over `n` items; its position is saved in checkpoints and restored exactly."""

    def __init__(self, n: int, *, seed: int, report: LoadReport | None = None):
        if n == 0:
            counts = f" ({report.summary()})" if report is not None else ""
            raise DataError(
                f"no training examples are left after validation and truncation{counts}; a row too long for "
                "data.max_length is dropped, also when truncating would leave it nothing to train on",
                reason="empty dataset",
            )
        self.n, self.seed = n, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def take(self, count: int) -> list[int]:
        picked = []
        while len(picked) < count:
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(count - len(picked), self.n - self.cursor)
            picked += self._order[self.cursor : self.cursor + take]
            self.cursor += take
        return picked

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=generator).tolist()


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def trainable_parameters(model: torch.nn.Module) -> Iterable[torch.nn.Parameter]:
    return (p for p in model.parameters() if p.requires_grad)
