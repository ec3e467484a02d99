"""Qwen3: Llama's layer with an RMSNorm on every query and key head before RoPE, windows by layer type."""

from posttrain.policies.families.adapter import Family, window_by_layer_type

QWEN3 = Family("qwen3", ("qwen3",), qk_norm="head", window=window_by_layer_type)

ADAPTERS = (QWEN3,)
