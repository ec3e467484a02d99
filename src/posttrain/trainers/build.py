"""Builder functions shared by the trainers: each turns one config section into a built part.

Trainers call these once, before their loop; the loops never build anything.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.config.loading import ConfigError
from posttrain.config.rl import SamplingSection
from posttrain.config.sections import ModelSection, TrainSection
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
from posttrain.rewards import LoadedReward, RewardSet, RewardSpec
from posttrain.rollout import SamplingParams
from posttrain.rollout.decoders import cuda_graphs_enabled
from posttrain.runtime.checkpoint import model_dir
from posttrain.runtime.model_files import holds_tokenizer
from posttrain.runtime.optim import build_adamw, build_scheduler
from posttrain.tasks import build_builtin_tokenizer

Rows = Sequence[dict[str, Any]] | Any  # a list of dicts or a `datasets.Dataset`


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
    set_chat_template(tokenizer, section.chat_template, recipe_dir)
    if model is not None:
        model = model.to(device)
    elif section.quantization is not None:
        model = load_quantized(resolve_path(section.path, recipe_dir), section.quantization, device=device,
                               gradient_checkpointing=section.gradient_checkpointing)  # fmt: skip
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


def load_quantized(path: Path, bits: str, *, device: torch.device, gradient_checkpointing: bool) -> Any:
    """A causal LM with its weights in 4-bit NF4 (double quantisation, bfloat16 compute: QLoRA's setting) or 8-bit
    through bitsandbytes, on the run's CUDA device, made ready for a LoRA adapter (peft's
    prepare_model_for_kbit_training: norms in float32, input gradients on). ConfigError off a CUDA device or without
    bitsandbytes."""
    if device.type != "cuda":
        raise ConfigError(f"model.quantization: {bits} loading runs bitsandbytes' CUDA kernels, and this run's device "
                          f"is {device} (no CUDA GPU): drop model.quantization, or run on a GPU")  # fmt: skip
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("model.quantization needs bitsandbytes: pip install 'posttrain[quantization]'")
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    check_model_directory(path)
    quantization = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
        if bits == "4bit" else BitsAndBytesConfig(load_in_8bit=True)
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.bfloat16,
                                                 device_map={"": device.index or 0}, local_files_only=True)  # fmt: skip
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def set_chat_template(tokenizer: Any, template: str | None, recipe_dir: str | None) -> None:
    """model.chat_template on the tokenizer: the Jinja text itself when it holds a Jinja tag, else a file's text."""
    if template is None:
        return
    if "{%" not in template and "{{" not in template:
        path = resolve_path(template, recipe_dir)
        if not path.is_file():
            raise ConfigError(f"model.chat_template: {template!r} is no file (looked in the working directory"
                              f"{' and beside the recipe' if recipe_dir else ''}) and holds no Jinja tag ({{% or {{{{)")
        try:
            template = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"model.chat_template: {path} is not UTF-8 text") from None
    tokenizer.chat_template = template


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


def check_environment() -> None:
    """Check the environment variables a run reads later, so that a misspelt one stops it before anything is
    built, rather than where it is first read, or never: POSTTRAIN_CPU_MATMUL (read at the first product large
    enough for oneDNN) and POSTTRAIN_CUDA_GRAPHS (read when a CUDA model builds its decoder). Every run calls it
    first (`lifecycle.Lifecycle`, evaluation). It also caps oneDNN's kernel caches (`cpu_matmul.bound_kernel_caches`)
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


def trainable_parameters(model: torch.nn.Module) -> Iterable[torch.nn.Parameter]:
    return (p for p in model.parameters() if p.requires_grad)


def build_reward_set(
    entries: list[Any], rewards: list[Any] | None, recipe_dir: str | None, *, max_failure_fraction: float
) -> RewardSet:
    """The config's reward entries, or `rewards` (TRL-style callables or RewardSpecs) in their place."""
    if rewards is None:
        specs = [RewardSpec(**entry.model_dump()) for entry in entries]
        return RewardSet.from_specs(specs, recipe_dir, max_failure_fraction=max_failure_fraction)
    loaded = []
    for i, r in enumerate(rewards):
        if callable(r):
            loaded.append(LoadedReward(getattr(r, "__name__", f"reward_{i}"), r, timeout_s=None))
        else:
            loaded += RewardSet.from_specs([r], recipe_dir).rewards
    return RewardSet(loaded, max_failure_fraction=max_failure_fraction)


def sampling_params(s: SamplingSection, eos_token_id: int) -> tuple[SamplingParams, SamplingParams]:
    """(the sampler's parameters from a config's `sampling` section, greedy decoding with the same length and stop
    token)."""
    params = SamplingParams(
        max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
        min_p=s.min_p, stop_token_ids=(eos_token_id,), stop_strings=tuple(s.stop_strings),
    )  # fmt: skip
    return params, SamplingParams(max_new_tokens=s.max_new_tokens, temperature=0.0, stop_token_ids=(eos_token_id,))
