"""Mixtures of experts whose attention is Llama's: Mixtral (Jiang et al. 2024, arXiv:2401.04088; a sliding window
on every layer when set) and Qwen2-MoE (biases on q, k and v, windows by layer type, a shared expert beside the
routed ones). Each layer's MLP is the model's own sparse block, routing included; Mixtral's router noise while
training is beyond the adapter."""

from dataclasses import replace
from typing import Any

from posttrain.policies.families.adapter import Family, window_by_layer_type, window_on_every_layer


def router_noise(config: Any, training: bool) -> str | None:
    noisy = training and getattr(config, "router_jitter_noise", 0)
    return "router jitter noise (router_jitter_noise) while training" if noisy else None


MIXTRAL = Family("mixtral", ("mixtral",), mlp_block=True, window=window_on_every_layer, refuses=router_noise)
QWEN2_MOE = replace(MIXTRAL, name="qwen2_moe", model_types=("qwen2_moe",), window=window_by_layer_type)

ADAPTERS = (MIXTRAL, QWEN2_MOE)
