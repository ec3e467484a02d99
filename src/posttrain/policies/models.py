"""Causal LMs: load any Hugging Face model from a local path, or build a tiny one from a named preset.

Nothing here downloads: a path that is not a local model directory is an error that says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from posttrain.runtime.model_files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MODEL_CONFIG,
    TOKENIZER_FILES,
    holds_tokenizer,
    is_adapter_directory,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}




class ModelLoadError(ValueError):
    """A model or tokenizer path that cannot be used, with what was found there."""


@dataclass(frozen=True)
class Preset:
    family: str
    """A key of FAMILY_MODEL_TYPES."""
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tie_embeddings: bool = True
    extra: tuple[tuple[str, Any], ...] = ()
    """More config values (a mixture of experts' sizes)."""


# Parameter counts are for a 378-token vocabulary (the arithmetic tokenizer); embeddings grow with V.
MODEL_PRESETS: dict[str, Preset] = {
    "qwen2-tiny": Preset("qwen2", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=192),  # ~0.1M
    "llama-tiny": Preset("llama", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=192),
    "qwen2-small": Preset("qwen2", hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384),  # ~0.7M
    "llama-small": Preset("llama", hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384),
    "qwen2-base": Preset("qwen2", hidden=256, layers=6, heads=8, kv_heads=4, intermediate=768),  # ~4M
    "qwen2-30m": Preset("qwen2", hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1536),  # ~24M
    "qwen2-0.5b-shape": Preset("qwen2", hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864),
    # the demo model's shape in every other family with an adapter (policies/families/); each family's own defaults
    # for the rest (windows, soft-caps, norms), head_dim = hidden / heads
    **{
        f"{family}-small": Preset(family, hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384)
        for family in ("mistral", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "olmo2")
    },
    # 4 experts, 2 per token, each half the dense MLP (Qwen2-MoE: a shared expert of the dense size beside them)
    "mixtral-small": Preset("mixtral", hidden=128, layers=4, heads=4, kv_heads=2, intermediate=192,
                            extra=(("num_local_experts", 4), ("num_experts_per_tok", 2))),
    "qwen2_moe-small": Preset("qwen2_moe", hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384,
                              extra=(("num_experts", 4), ("num_experts_per_tok", 2), ("moe_intermediate_size", 192),
                                     ("shared_expert_intermediate_size", 384))),
}  # fmt: skip

FAMILY_MODEL_TYPES = {
    "llama": "llama", "qwen2": "qwen2", "mistral": "mistral", "qwen3": "qwen3", "gemma": "gemma",
    "gemma2": "gemma2", "gemma3": "gemma3_text", "phi3": "phi3", "olmo2": "olmo2", "mixtral": "mixtral",
    "qwen2_moe": "qwen2_moe",
}  # fmt: skip
"""A preset's family -> the transformers `model_type` of its config."""


def preset_config(
    name: str,
    *,
    vocab_size: int,
    max_positions: int = 2048,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> Any:
    if name not in MODEL_PRESETS:
        raise ModelLoadError(f"model.preset: '{name}' is not a preset; presets: {', '.join(MODEL_PRESETS)}")
    p = MODEL_PRESETS[name]
    head_dim = {"head_dim": p.hidden // p.heads} if p.family in ("qwen3", "gemma", "gemma2", "gemma3") else {}
    if p.family in ("gemma2", "gemma3"):
        head_dim["query_pre_attn_scalar"] = p.hidden // p.heads  # Gemma's score scale, head_dim^-1/2 as released
    return AutoConfig.for_model(
        FAMILY_MODEL_TYPES[p.family],
        **head_dim,
        **dict(p.extra),
        vocab_size=vocab_size,
        hidden_size=p.hidden,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        num_key_value_heads=p.kv_heads,
        intermediate_size=p.intermediate,
        max_position_embeddings=max_positions,
        tie_word_embeddings=p.tie_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )


def build_model(
    preset: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int = 0,
    dtype: str = "float32",
    vocab_size: int | None = None,
) -> PreTrainedModel:
    """A randomly initialised causal LM of a named preset, sized to the tokenizer's vocabulary, or to `vocab_size`
    rows of embedding and head (at least the tokenizer's; released checkpoints pad theirs, Qwen2's 151,936 rows hold
    151,665 tokens)."""
    vocab = len(tokenizer) if vocab_size is None else vocab_size
    if vocab < len(tokenizer):
        raise ValueError(f"build_model: vocab_size {vocab} is below the tokenizer's {len(tokenizer)} tokens")
    config = preset_config(
        preset,
        vocab_size=vocab,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def load_model(
    path: str | Path,
    *,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    gradient_checkpointing: bool = False,
) -> PreTrainedModel:
    """Any Hugging Face causal LM from a local directory (safetensors or bin weights); a LoRA adapter directory
    (a LoRA run's `final/`) gives its base with the adapter merged."""
    if Path(path).is_dir() and is_adapter_directory(path):
        model = merged_adapter_model(path, dtype=dtype)
        if gradient_checkpointing:
            enable_gradient_checkpointing(model)
        return model.to(device)
    directory = check_model_directory(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=DTYPES[dtype], local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"model.path: cannot load a causal LM from {directory}: {error}") from error
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model.to(device)


def check_model_directory(path: str | Path, key: str = "model.path") -> Path:
    """The directory, if it can hold a Hugging Face model (it exists and has a config.json, or is a LoRA adapter
    directory)."""
    directory = _local_directory(path, key)
    if not (directory / MODEL_CONFIG).is_file() and not is_adapter_directory(directory):
        raise ModelLoadError(f"{key}: {directory} has no config.json; it is not a Hugging Face model directory")
    return directory


def load_tokenizer(path: str | Path, key: str = "model.tokenizer") -> PreTrainedTokenizerBase:
    """A tokenizer from a local directory. `key`: the config key named in errors."""
    directory = _local_directory(path, key)
    if not holds_tokenizer(directory):
        found = ", ".join(sorted(p.name for p in directory.iterdir())[:8]) or "nothing"
        raise ModelLoadError(
            f"{key}: {directory} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}; found {found})"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())  # transformers' messages span several lines
        raise ModelLoadError(f"{key}: cannot load a tokenizer from {directory}: {reason}") from error
    if tokenizer.pad_token_id is None:
        # Padding is masked out everywhere; EOS is the conventional stand-in (TRL does the same).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    # transformers 5.24 renamed gradient checkpointing to activation checkpointing (the old name warns, and goes in v6)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def apply_lora(
    model: PreTrainedModel,
    *,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: list[str] | str,
    base_path: str | Path | None = None,
) -> PreTrainedModel:
    """Wrap with a peft LoRA adapter (optional extra `posttrain[lora]`). `base_path`: the local directory of the
    base model, written into the adapter's config so that the saved adapter loads on it."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ModelLoadError("model.lora needs peft: pip install 'posttrain[lora]'") from error
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    if base_path is not None:  # get_peft_model takes the model's name_or_path, which a built model lacks
        peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path = str(Path(base_path).resolve())
    return peft_model


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability of the model to 0: `nn.Dropout` modules and the float probabilities attention
    modules read while training (`attention_dropout`), as TRL's `disable_dropout_in_model` does for the first.
    LoRA layers wrapped later keep their own `lora_dropout`. The model's config is left as it was."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if type(value) is float and "drop" in name:  # attention_dropout, resid_pdrop, layerdrop
                setattr(module, name, 0.0)


def is_lora(model: Any) -> bool:
    """Whether `model` is a peft model with adapters."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def save_pretrained(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    directory: str | Path,
    state_dict: dict[str, Any] | None = None,
) -> Path:
    """A standard Hugging Face directory (safetensors): the model, or for a peft LoRA model its trained adapter
    only (`adapter_config.json`, `adapter_model.safetensors`, the base model's path inside), which transformers'
    and peft's `from_pretrained` load on that base and `posttrain export --merge` merges into a full model.
    `state_dict`: the weights to write in place of the model's own (an FSDP2 model's, gathered whole)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if is_lora(model):
        model.save_pretrained(directory, selected_adapters=[model.active_adapter], safe_serialization=True)
    else:
        model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def load_adapter_weights(model: Any, directory: str | Path) -> None:
    """Load the adapter a `save_pretrained` of a LoRA model wrote into `model`'s active adapter, in place."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(Path(directory) / ADAPTER_WEIGHTS, device=str(model.device))
    result = set_peft_model_state_dict(model, weights, adapter_name=model.active_adapter)
    if getattr(result, "unexpected_keys", None):
        raise ModelLoadError(f"{directory}: adapter weights {result.unexpected_keys[:3]} fit no module of the model")


def adapter_base_path(path: str | Path) -> Path:
    """The base model directory an adapter directory names (`base_model_name_or_path`)."""
    config = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    base = config.get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise ModelLoadError(
            f"{path} holds a LoRA adapter whose base model ({base!r}) is not a local directory; "
            "merge it with `posttrain export RUN --merge` where the base is, or fix base_model_name_or_path"
        )
    return Path(base)


def merged_adapter_model(path: str | Path, *, dtype: str = "float32") -> PreTrainedModel:
    """The full model of an adapter directory: its base with the adapter merged into the weights."""
    from peft import PeftModel

    base = load_model(adapter_base_path(path), dtype=dtype)
    return PeftModel.from_pretrained(base, str(path)).merge_and_unload()


def _local_directory(path: str | Path, key: str) -> Path:
    directory = Path(path).expanduser()
    if not directory.exists():
        raise ModelLoadError(f"{key}: {directory} does not exist (posttrain loads local directories only)")
    if not directory.is_dir():
        raise ModelLoadError(f"{key}: {directory} is a file, not a model directory")
    return directory


def model_config(path: str | Path) -> Any:
    return AutoConfig.from_pretrained(_local_directory(path, "model.path"), local_files_only=True)
