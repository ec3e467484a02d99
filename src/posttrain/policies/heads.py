"""Heads on a policy's body: the critic's value head (PPO), the reward model's scalar head and the process reward
model's per-token one.

    critic = ValueModel(policy)                          # values_B_T aligned with tokens, like every per-token tensor
    reward_model = build_reward_model(path=..., tokenizer=tokenizer, seed=0)   # a one-label sequence classifier
    prm = build_reward_model(path=..., tokenizer=tokenizer, seed=0, per_token=True)   # a one-label token classifier
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

from posttrain.policies.logprobs import hidden_states_at
from posttrain.policies.models import DTYPES, MODEL_PRESETS, ModelLoadError, preset_config


class ValueModel(torch.nn.Module):
    """A critic: a copy of the policy's backbone with a scalar head (initialised to 0).

    values_B_T[b, t] is the value of the state in which token t is chosen, read from the hidden state at
    t - 1, so it is aligned with tokens like every per-token tensor (column 0 is 0)."""

    def __init__(self, policy: Any):
        super().__init__()
        self.backbone = copy.deepcopy(policy.get_decoder())
        self.head = torch.nn.Linear(policy.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, input_ids_B_T: Tensor, attention_mask_B_T: Tensor, read_mask_B_T: Tensor | None = None) -> Tensor:
        """Values [B, T] float32 at the positions of `read_mask_B_T` (bool [B, T]; None: every position after a
        real token), 0 elsewhere. The backbone computes only the hidden states these values read, on real
        tokens only for Llama-family models (`hidden_states_at`), as the policy's forward does."""
        real_B_T = attention_mask_B_T.bool()
        read_B_T = torch.zeros_like(real_B_T)
        read_B_T[:, 1:] = real_B_T[:, :-1] if read_mask_B_T is None else read_mask_B_T[:, 1:]
        source_B_T = torch.zeros_like(read_B_T)  # the hidden states read: value t comes from t - 1
        source_B_T[:, :-1] = read_B_T[:, 1:]
        hidden_M_H = hidden_states_at(self.backbone, input_ids_B_T, attention_mask_B_T, None, source_B_T)
        v_M = self.head(hidden_M_H).squeeze(-1).float()
        return torch.zeros_like(read_B_T, dtype=torch.float32).masked_scatter(read_B_T, v_M)


def build_reward_model(
    *, path: str | Path | None, preset: str | None, tokenizer: Any, seed: int, dtype: str = "float32",
    per_token: bool = False,
) -> Any:  # fmt: skip
    """A sequence classifier with one output (the reward): from a model directory (a causal LM's body gets a new,
    seeded head) or a new model of a preset. pad_token_id is set: the head reads the last non-padding token.

    per_token: a token classifier with one output at every token instead (a process reward model, read at each
    step's last token), its head without a bias, so that its weights are also a sequence classifier's: the saved
    model loads with AutoModelForTokenClassification, and with AutoModelForSequenceClassification as the score of a
    text's last token."""
    auto = AutoModelForTokenClassification if per_token else AutoModelForSequenceClassification
    head = {"token_classification_bias": False} if per_token else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if path is not None:
            model = auto.from_pretrained(path, num_labels=1, dtype=DTYPES[dtype], local_files_only=True, **head)
        else:
            if preset not in MODEL_PRESETS:
                raise ModelLoadError(f"model.preset: '{preset}' is not a preset; presets: {', '.join(MODEL_PRESETS)}")
            ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                   "eos_token_id": tokenizer.eos_token_id}  # fmt: skip
            config = preset_config(preset, vocab_size=len(tokenizer), **ids)
            config.num_labels = 1
            for key, value in head.items():
                setattr(config, key, value)
            model = auto.from_config(config, dtype=DTYPES[dtype])
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def scalar_rewards(model: Any, input_ids_B_T: Tensor, attention_mask_B_T: Tensor, *, bf16: bool) -> Tensor:
    """One reward per row [B] (float32): the scalar head at each row's last real token."""
    with torch.autocast(input_ids_B_T.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=input_ids_B_T, attention_mask=attention_mask_B_T.long(), use_cache=False).logits
    return logits.squeeze(-1).float()


def token_scores(model: Any, input_ids_B_T: Tensor, attention_mask_B_T: Tensor, at_B_T: Tensor, *,
                 bf16: bool = False) -> Tensor:  # fmt: skip
    """A token classifier's one logit at the positions of `at_B_T` (bool [B, T]), in row-major order [S] float32."""
    with torch.autocast(input_ids_B_T.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=input_ids_B_T, attention_mask=attention_mask_B_T.long(), use_cache=False).logits
    return logits[..., 0][at_B_T].float()
