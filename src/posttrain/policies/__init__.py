"""What is trained: causal LMs from local paths or presets, LoRA, chunked per-token log-probs; one adapter per
model family (`families/`) for the layer forward that training and decoding share."""

from posttrain.policies.families import describe_forward_path
from posttrain.policies.logprobs import gather_logprobs_and_entropy, hidden_states_at, token_logprobs
from posttrain.policies.models import (
    DTYPES,
    MODEL_PRESETS,
    ModelLoadError,
    apply_lora,
    build_model,
    enable_gradient_checkpointing,
    load_model,
    load_tokenizer,
    save_pretrained,
)

__all__ = [
    "DTYPES",
    "MODEL_PRESETS",
    "ModelLoadError",
    "apply_lora",
    "build_model",
    "describe_forward_path",
    "enable_gradient_checkpointing",
    "gather_logprobs_and_entropy",
    "hidden_states_at",
    "load_model",
    "load_tokenizer",
    "save_pretrained",
    "token_logprobs",
]
