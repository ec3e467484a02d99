"""Mixtures of experts whose attention is Llama's: Mixtral (Jiang et al. 2024, arXiv:2401.04088; a sliding window
on every layer when set) and Qwen2-MoE (biases on q, k and v, windows by layer type, a shared expert beside the
routed ones). Each sparse block's routing and experts are computed as `Experts` describes them (Mixtral always
renormalises its top-k probabilities, Qwen2-MoE where `norm_topk_prob`); Mixtral's router noise while training is
beyond the adapter."""

from dataclasses import replace
from typing import Any

from posttrain.policies.families.adapter import Experts, Family, window_by_layer_type, window_on_every_layer


def renormalised(config: Any) -> bool:
    return bool(getattr(config, "norm_topk_prob", False))


def router_noise(config: Any, training: bool) -> str | None:
    noisy = training and getattr(config, "router_jitter_noise", 0)
    return "router jitter noise (router_jitter_noise) while training" if noisy else None


MIXTRAL = Family(
    "mixtral", ("mixtral",), mlp_block=True, window=window_on_every_layer, refuses=router_noise,
    experts=Experts(("MixtralSparseMoeBlock",), normalises=lambda config: True),
)  # fmt: skip
QWEN2_MOE = replace(
    MIXTRAL, name="qwen2_moe", model_types=("qwen2_moe",), window=window_by_layer_type,
    experts=Experts(("Qwen2MoeSparseMoeBlock",), normalises=renormalised,
                    weights_in_float32=False, shared_expert=True),
)  # fmt: skip

ADAPTERS = (MIXTRAL, QWEN2_MOE)
