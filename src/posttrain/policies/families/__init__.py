"""Model families: one adapter per family (`adapter.Family`), the only place a family is described (STYLE.md §9).

Every module of this package but `adapter` holds adapters in a tuple `ADAPTERS`; they are found by importing the
package, so a new family is one new module here (and its entry in tests/policies/test_families.py, which holds
it equal to transformers' forward and `generate`). A model whose `config.model_type` no adapter names, or that an
adapter cannot reproduce (`training_refusal`, `decoding_refusal`), runs transformers' own forward;
`describe_forward_path` says which path a model takes, for a run's first lines.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from posttrain.policies.families.adapter import Family

FAMILIES: dict[str, Family] = {}
"""`config.model_type` -> its family's adapter."""

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "adapter":
        for _family in importlib.import_module(f"{__name__}.{_module.name}").ADAPTERS:
            FAMILIES.update(dict.fromkeys(_family.model_types, _family))

ATTENTION_KERNELS = frozenset({"eager", "sdpa"})
"""`config._attn_implementation`s whose results the shared layer forward reproduces (flash and flex kernels
differ in their numerics and features, and a custom registered kernel may do anything)."""

POSITION_DEPENDENT_ROPE = frozenset({"dynamic", "longrope"})
"""RoPE types whose frequencies transformers chooses from the largest position a forward is given
(`dynamic_rope_update`): the static decoder's one table over every slot of a generation would pick them from
prompt width + max_new_tokens, not from the positions the model's forward sees at each step."""


def base_model(model: Any) -> Any:
    """The transformers model under a peft wrapper (LoRA layers stay in place and are called as modules)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_of(model: Any) -> Any:
    """The decoder stack (embeddings, layers, final norm) of a causal LM, under any peft wrapper, or the
    model itself when it is one already (a bare `LlamaModel`, as the PPO critic's backbone)."""
    body = base_model(model)
    # recent transformers' generic `get_decoder` returns a bare decoder itself; older ones define it on LMs only
    get_decoder = getattr(body, "get_decoder", None)
    return body if get_decoder is None else get_decoder()


def has_hooks(model: Any) -> bool:
    """Whether a module of the model has forward hooks (FSDP's parameter gathering, a user's probe), which the
    shared layer forward would not run: it calls the layers' Linear maths directly."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def family_of(model: Any) -> Family | None:
    """The adapter of the model's `config.model_type`, or None."""
    return FAMILIES.get(getattr(getattr(model, "config", None), "model_type", None))


def training_refusal(model: Any) -> str | None:
    """Why the shared layer forward would not reproduce this model's training forward as it is now (train or eval
    mode), or None when it does."""
    reason = _family_refusal(model, training=model.training)
    if reason is not None:
        return reason
    config = model.config
    kernel = getattr(config, "_attn_implementation", "eager")
    if kernel not in ATTENTION_KERNELS:
        return f"attention implementation {kernel}"
    if model.training and getattr(config, "attention_dropout", 0.0):
        return "attention dropout while training"
    # transformers sets the flag as an instance attribute; vars() skips Module.__getattr__, which raises and
    # catches an AttributeError for every module without it (3x the scan's time, on every forward)
    if any(vars(m).get("gradient_checkpointing", False) for m in model.modules()):
        return "activation checkpointing is on"
    return "forward hooks on its modules" if has_hooks(model) else None


def decoding_refusal(model: Any) -> str | None:
    """Why the native engine's static-cache decoder would not reproduce this model's forward, or None."""
    reason = _family_refusal(model, training=False)
    if reason is not None:
        return reason
    if has_hooks(model):
        return "forward hooks on its modules"
    rope_types = getattr(decoder_of(model).rotary_emb, "rope_type", "default")
    for rope in rope_types.values() if isinstance(rope_types, dict) else (rope_types,):
        if rope in POSITION_DEPENDENT_ROPE:
            return f"{rope} RoPE, whose frequencies depend on the longest position seen"
    return None


def describe_forward_path(model: Any) -> str:
    """One line for a run's start: which forward computes training log-probs and which decodes, and why a model
    takes transformers' forward, e.g. "forward path: posttrain's layer forward (qwen2 adapter) for training and
    decoding" or "forward path: transformers' forward for training and decoding (no adapter for gpt2)"."""
    family = family_of(model)
    ours = f"posttrain's layer forward ({family.name if family else '-'} adapter)"
    training, decoding = training_refusal(model), decoding_refusal(model)
    if training is None and decoding is None:
        return f"forward path: {ours} for training and decoding"
    if training == decoding:
        return f"forward path: transformers' forward for training and decoding ({training})"
    parts = [
        f"{ours} for {task}" if reason is None else f"transformers' forward for {task} ({reason})"
        for task, reason in (("training", training), ("decoding", decoding))
    ]
    return "forward path: " + "; ".join(parts)


def _family_refusal(model: Any, *, training: bool) -> str | None:
    family = family_of(model)
    if family is None:
        return f"no adapter for {getattr(getattr(model, 'config', None), 'model_type', type(model).__name__)}"
    missing = _missing_module(decoder_of(model), family)
    if missing is not None:
        return f"its {family.name} decoder has no {missing}"
    return family.refuses(model.config, training)


def _missing_module(body: Any, family: Family) -> str | None:
    """The first module the adapter names that the decoder (or its first layer) lacks, or None."""
    if len(getattr(body, "layers", ())) == 0:
        return "layers"
    needed = [("", name) for name in ("embed_tokens", "norm", "rotary_emb")]
    norms = (family.attention_in_norm, family.attention_out_norm, family.mlp_in_norm, family.mlp_out_norm)
    needed += [("layers.0.", name) for name in norms if name is not None]
    needed += [("layers.0.self_attn.", name) for name in (*family.qkv, "o_proj", "scaling", "head_dim")]
    needed += [("layers.0.self_attn.", name) for name in ("q_norm", "k_norm") if family.qk_norm is not None]
    if family.mlp_block:
        needed.append(("layers.0.", "mlp"))
    else:
        needed += [("layers.0.mlp.", name) for name in (*family.gate_up, "down_proj", family.activation)]
    for prefix, name in needed:
        owner = body
        for part in prefix.split(".")[:-1]:
            owner = owner[int(part)] if part.isdigit() else getattr(owner, part, None)
        if owner is None or not hasattr(owner, name):
            return prefix + name
    return None
