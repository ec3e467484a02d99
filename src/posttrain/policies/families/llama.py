"""Llama and the families whose layers are Llama's: Mistral (a sliding window on every layer) and Qwen2 (biases
on q, k and v, windows on the layers `layer_types` marks)."""

from dataclasses import replace

from posttrain.policies.families.adapter import Family, window_by_layer_type, window_on_every_layer

LLAMA = Family("llama", ("llama",))
MISTRAL = replace(LLAMA, name="mistral", model_types=("mistral",), window=window_on_every_layer)
QWEN2 = replace(LLAMA, name="qwen2", model_types=("qwen2",), window=window_by_layer_type)

ADAPTERS = (LLAMA, MISTRAL, QWEN2)
