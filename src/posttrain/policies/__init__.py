"""What is trained: causal LMs from local paths or presets, LoRA, chunked per-token log-probs; one adapter per
model family (`families/`) for the layer forward that training and decoding share."""

from posttrain.policies.families import describe_forward_path
from posttrain.policies.heads import ValueModel, build_reward_model, scalar_rewards
from posttrain.policies.logprobs import gather_logprobs_and_entropy, hidden_states_at, token_logprobs
from posttrain.policies.models import (
    DTYPES,
    MODEL_PRESETS,
    ModelLoadError,
    apply_lora,
    build_model,
    disable_dropout,
    enable_gradient_checkpointing,
    is_lora,
    load_adapter_weights,
    load_model,
    load_tokenizer,
    save_pretrained,
)
from posttrain.policies.reference import AdapterOff, FrozenCopy, Reference, build_reference

__all__ = [
    "DTYPES",
    "MODEL_PRESETS",
    "AdapterOff",
    "FrozenCopy",
    "ModelLoadError",
    "Reference",
    "ValueModel",
    "apply_lora",
    "build_model",
    "build_reference",
    "build_reward_model",
    "describe_forward_path",
    "disable_dropout",
    "enable_gradient_checkpointing",
    "gather_logprobs_and_entropy",
    "hidden_states_at",
    "is_lora",
    "load_adapter_weights",
    "load_model",
    "load_tokenizer",
    "save_pretrained",
    "scalar_rewards",
    "token_logprobs",
]
