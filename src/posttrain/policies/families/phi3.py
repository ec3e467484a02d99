"""Phi-3 (Abdin et al. 2024, arXiv:2404.14219): Llama's layer with q, k and v in one projection and gate and up in
another, RoPE on a leading share of each head (`partial_rotary_factor`), a sliding window on every layer when
set, and dropout on the residual branches (beyond the adapter while it is on)."""

from typing import Any

from posttrain.policies.families.adapter import Family, window_on_every_layer


def residual_dropout(config: Any, training: bool) -> str | None:
    return "residual dropout (resid_pdrop) while training" if training and getattr(config, "resid_pdrop", 0) else None


PHI3 = Family(
    "phi3", ("phi3",), qkv=("qkv_proj",), gate_up=("gate_up_proj",), activation="activation_fn",
    window=window_on_every_layer, refuses=residual_dropout,
)  # fmt: skip

ADAPTERS = (PHI3,)
