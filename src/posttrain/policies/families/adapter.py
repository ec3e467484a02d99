"""What an adapter says about its family's decoder layer (`Family`), and the ways families place sliding windows.

The layer forward that training and decoding share (`policies/decoder_layer.py`) computes, for every family,

    a = x + norm_attention_out(o(attention(rope(qk_norm(q(n))), rope(qk_norm(k(n))), v(n))))   n = norm_attention_in(x)
    y = a + norm_mlp_out(down(act(gate(m)) * up(m)))                                          m = norm_mlp_in(a)

(or the layer's own mixture-of-experts block in place of down(act(gate(m)) * up(m)))
with RMSNorms y = x_hat * (offset + w); a family's adapter names which of these parts its layers have, where its
modules are, and how its attention differs (soft-capping, sliding windows, RoPE tables per layer type).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Norm:
    """A family's RMSNorm: y = x_hat * (offset + w), x_hat = x (mean(x^2) + eps)^-1/2 (Zhang & Sennrich 2019,
    arXiv:1910.07467), computed in float32. `round_before_weight`: in half precision x_hat is rounded to x's dtype
    before the weight multiplies it (Llama), else the product is rounded (Gemma, OLMo2)."""

    offset: float = 0.0
    round_before_weight: bool = True
    eps: str = "variance_epsilon"
    """The norm module's attribute holding eps."""


def no_window(config: Any, index: int) -> int | None:
    """Every layer attends to every earlier token (Llama, OLMo2)."""
    return None


def window_on_every_layer(config: Any, index: int) -> int | None:
    """`config.sliding_window` on every layer when it is set (Mistral, Phi-3)."""
    return getattr(config, "sliding_window", None)


def window_by_layer_type(config: Any, index: int) -> int | None:
    """`config.sliding_window` on the layers `config.layer_types` marks "sliding_attention" (Qwen2, Qwen3,
    Gemma 2 and 3)."""
    layer_types = getattr(config, "layer_types", None) or ()
    sliding = index < len(layer_types) and layer_types[index] == "sliding_attention"
    return config.sliding_window if sliding else None


def no_refusal(config: Any, training: bool) -> str | None:
    return None


@dataclass(frozen=True)
class Experts:
    """A family's mixture-of-experts block as the shared layer forward computes it (`decoder_layer.experts_op`):
    a router's softmax over E experts, the top k of them per token, each expert a gated MLP
    down_e(act(gate_e(x)) * up_e(x)) whose weights are [E, 2I, H] (gate then up) and [E, H, I], combined as

        y = sum over the token's top k experts e of p_e down_e(act(gate_e(x)) * up_e(x))
            (+ sigmoid(shared_gate(x)) shared(x), with a shared expert)

    where p_e is the router's softmax (in float32), renormalised over the k where `normalises`. Layers whose MLP is
    of another module type (a dense layer among sparse ones) run their module as it is."""

    block_types: tuple[str, ...]
    """Class names of the sparse blocks computed so; module attributes `gate` (the router: `weight`, `top_k`),
    `experts` (`gate_up_proj`, `down_proj`, `act_fn`) and, with a shared expert, `shared_expert` (a gated MLP
    of Linear layers) and `shared_expert_gate`."""
    normalises: Callable[[Any], bool]
    """config -> whether the top-k probabilities are divided by their sum."""
    weights_in_float32: bool = True
    """The top-k probabilities weigh the experts' outputs in float32 (Mixtral), or rounded to the router logits'
    dtype (Qwen2-MoE)."""
    shared_expert: bool = False


@dataclass(frozen=True)
class Family:
    """One family's decoder layer, as `policies/decoder_layer.py` builds it (see the module docstring). Module
    names are attributes of a transformers decoder layer (norms), of its `self_attn` (projections, q/k norms) or of
    its `mlp` (projections, activation); a norm that is None is absent."""

    name: str
    model_types: tuple[str, ...]
    """`config.model_type`s this adapter describes."""
    norm: Norm = Norm()
    attention_in_norm: str | None = "input_layernorm"
    attention_out_norm: str | None = None
    mlp_in_norm: str | None = "post_attention_layernorm"
    mlp_out_norm: str | None = None
    qk_norm: Literal["head", "projection"] | None = None
    """RMSNorms `q_norm` and `k_norm` on each head's D features (Qwen3, Gemma 3) or on the whole projection
    (OLMo2), before RoPE."""
    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    """The query, key and value projections, or one fused projection whose output stacks them (Phi-3)."""
    gate_up: tuple[str, ...] = ("gate_proj", "up_proj")
    """The gate and up projections, or one fused projection whose output stacks gate then up (Phi-3)."""
    activation: str = "act_fn"
    mlp_block: bool = False
    """The layer's `mlp` runs as its own module over the tokens [1, X, H] instead of as gate, up and down: a mixture
    of experts, whose routing (top-k router, shared experts) is the model's own code (Mixtral, Qwen2-MoE), unless
    `experts` describes it."""
    experts: Experts | None = None
    """The family's sparse MLP block, computed by the shared layer forward where it applies (`Experts`)."""
    attention_softcap: str | None = None
    """The config attribute of the attention scores' soft-cap, cap * tanh(s / cap) (Gemma 2)."""
    final_softcap: str | None = None
    """The config attribute of the final logits' soft-cap (Gemma 2 and 3)."""
    window: Callable[[Any, int], int | None] = no_window
    """A layer's sliding window (a query sees itself and the window - 1 keys before it), or None."""
    rope_by_layer_type: bool = False
    """The rotary module takes a layer type and holds one table per type (Gemma 3's local and global bases)."""
    rope_keeps_dtype: bool = False
    """The rotated q and k are rounded back to the projection's dtype (OLMo2), where others keep the product's."""
    refuses: Callable[[Any, bool], str | None] = no_refusal
    """Why a config of this family (training or not) is beyond the adapter, or None."""
