"""Gemma 1-3 (Gemma Team 2024, arXiv:2403.08295, arXiv:2408.00118; 2025, arXiv:2503.19786).

All three: RMSNorm y = x_hat * (1 + w) rounded after the weight, GeGLU (the module's tanh GELU), embeddings
scaled by sqrt(H) (inside the model's embedding module). Gemma 2 adds a norm after attention and one each side
of the MLP, soft-capped attention scores and final logits, sliding windows on alternate layers and the score
scale query_pre_attn_scalar^-1/2 (the attention module's `scaling`). Gemma 3 adds q/k norms per head and a RoPE
table per layer type (local and global bases) and drops the attention soft-cap (transformers' Gemma 3 attention
ignores `attn_logit_softcapping`); its bidirectional variant (EmbeddingGemma) is not a causal LM.
"""

from dataclasses import replace
from typing import Any

from posttrain.policies.families.adapter import Family, Norm, window_by_layer_type


def bidirectional(config: Any, training: bool) -> str | None:
    return "bidirectional attention" if getattr(config, "use_bidirectional_attention", False) else None


GEMMA = Family("gemma", ("gemma",), norm=Norm(offset=1.0, round_before_weight=False, eps="eps"))
GEMMA2 = replace(
    GEMMA, name="gemma2", model_types=("gemma2",),
    attention_out_norm="post_attention_layernorm", mlp_in_norm="pre_feedforward_layernorm",
    mlp_out_norm="post_feedforward_layernorm", attention_softcap="attn_logit_softcapping",
    final_softcap="final_logit_softcapping", window=window_by_layer_type,
)  # fmt: skip
GEMMA3 = replace(
    GEMMA2, name="gemma3", model_types=("gemma3_text",), qk_norm="head", attention_softcap=None,
    rope_by_layer_type=True, refuses=bidirectional,
)  # fmt: skip

ADAPTERS = (GEMMA, GEMMA2, GEMMA3)
