"""The PPO critic (`ValueModel`) against its backbone's own forward over the padded batch.

Every expectation comes from `critic.backbone(input_ids, attention_mask)` (the Hugging Face forward with
the mask) and the critic's head, shifted by hand: value t is read from the hidden state at t - 1. Values at
the positions read, and the gradients of every critic parameter, must agree whether the critic ran on
real tokens only (Llama family) or fell back to the backbone's forward.
"""

import pytest
import torch

from posttrain.policies import ValueModel, build_model, enable_gradient_checkpointing
from posttrain.policies.unpadded import runs_unpadded
from posttrain.tasks import build_builtin_tokenizer

WIDTH = 14
PROMPT_LEN = 3


@pytest.fixture(scope="module")
def tokenizer():
    return build_builtin_tokenizer("arithmetic")


def sharp_critic(preset: str, tokenizer, *, seed: int, attention: str = "sdpa") -> ValueModel:
    """A critic whose weights (backbone and head) are drawn at std 0.2, so that attention is far from uniform
    and every value differs: a hidden state that sees the wrong keys, or is read at the wrong position, shows."""
    policy = build_model(preset, tokenizer, seed=seed)
    policy.set_attn_implementation(attention)
    critic = ValueModel(policy)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in critic.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
        critic.head.bias.fill_(0.1)
    return critic


def completions(lengths: list[int], vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ids [B, WIDTH], rows of `lengths` real tokens (right padding); completion mask: the real tokens
    after a PROMPT_LEN-token prompt (a row of 2 tokens has none)."""
    ids_B_T = torch.randint(3, vocab, (len(lengths), WIDTH), generator=torch.Generator().manual_seed(seed))
    attention_B_T = torch.arange(WIDTH)[None] < torch.tensor(lengths)[:, None]
    completion_B_T = attention_B_T & (torch.arange(WIDTH)[None] >= PROMPT_LEN)
    return ids_B_T, attention_B_T, completion_B_T


def plain_values(critic: ValueModel, ids_B_T: torch.Tensor, attention_B_T: torch.Tensor) -> torch.Tensor:
    """The backbone's forward over the padded batch with its mask, the head at every position, shifted so that
    column t holds the value read from the hidden state at t - 1 (column 0: 0). [B, T]"""
    hidden_B_T_H = critic.backbone(input_ids=ids_B_T, attention_mask=attention_B_T.long(), use_cache=False)
    v_B_T = critic.head(hidden_B_T_H.last_hidden_state).squeeze(-1).float()
    return torch.cat([torch.zeros(len(ids_B_T), 1), v_B_T[:, :-1]], dim=1)


def weighted_sum(values_B_T: torch.Tensor, read_B_T: torch.Tensor) -> torch.Tensor:
    # distinct weights per position, so that a value read from the wrong position changes the gradients
    weights_T = torch.linspace(0.5, 1.5, values_B_T.shape[1])
    return (torch.where(read_B_T, values_B_T, 0.0) * weights_T).sum()


def grads(critic: ValueModel) -> dict[str, torch.Tensor]:
    found = {n: p.grad.clone() for n, p in critic.named_parameters() if p.grad is not None}
    critic.zero_grad()
    return found


def assert_same_values_and_gradients(critic, ids_B_T, attention_B_T, read_mask_B_T, *, seed: int = 0) -> None:
    """critic(...) against `plain_values`: values where read (0 elsewhere) and the gradients of every parameter.
    `seed` is set before each forward, so that attention dropout draws the same masks in both."""
    read_B_T = read_mask_B_T
    if read_B_T is None:  # every position after a real token
        read_B_T = torch.cat([torch.zeros(len(ids_B_T), 1, dtype=torch.bool), attention_B_T[:, :-1]], dim=1)
    critic.zero_grad()
    torch.manual_seed(seed)
    values_B_T = critic(ids_B_T, attention_B_T, read_mask_B_T)
    weighted_sum(values_B_T, read_B_T).backward()
    fast = grads(critic)
    torch.manual_seed(seed)
    expected_B_T = plain_values(critic, ids_B_T, attention_B_T)
    weighted_sum(expected_B_T, read_B_T).backward()
    plain = grads(critic)
    assert values_B_T.dtype == torch.float32 and values_B_T.shape == ids_B_T.shape
    torch.testing.assert_close(values_B_T[read_B_T], expected_B_T[read_B_T].detach(), atol=1e-5, rtol=1e-5)
    assert (values_B_T[~read_B_T] == 0).all()
    assert (values_B_T[read_B_T] != 0).all()
    assert fast.keys() == plain.keys() == {n for n, _ in critic.named_parameters()}
    for name, grad in plain.items():
        # float32 sums in a different order: the tolerance scales with the gradient
        scale = float(grad.abs().max())
        torch.testing.assert_close(fast[name], grad, atol=1e-5 * max(scale, 1.0), rtol=1e-4, msg=name)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("preset", ["qwen2-small", "llama-small"])
def test_values_and_gradients_equal_the_backbones_padded_forward(preset, attention, tokenizer, unpadded_calls) -> None:
    # rows of 14, 2, 9, 5 and 11 real tokens: the row of 2 has no completion, most slots are padding somewhere
    critic = sharp_critic(preset, tokenizer, seed=0, attention=attention)
    assert runs_unpadded(critic.backbone)
    ids_B_T, attention_B_T, completion_B_T = completions([14, 2, 9, 5, 11], len(tokenizer), seed=1)
    assert_same_values_and_gradients(critic, ids_B_T, attention_B_T, completion_B_T)
    assert unpadded_calls["n"] == 1


def test_without_a_read_mask_every_position_after_a_real_token_has_its_value(tokenizer, unpadded_calls) -> None:
    critic = sharp_critic("qwen2-small", tokenizer, seed=2)
    ids_B_T, attention_B_T, _ = completions([14, 4, 10], len(tokenizer), seed=3)
    assert_same_values_and_gradients(critic, ids_B_T, attention_B_T, None)
    assert unpadded_calls["n"] == 1


@pytest.mark.parametrize("fallback", ["gradient_checkpointing", "attention_dropout"])
def test_what_the_unpadded_forward_would_not_reproduce_takes_the_backbones_forward(
    fallback, tokenizer, unpadded_calls
) -> None:
    critic = sharp_critic("llama-small", tokenizer, seed=4, attention="eager").train()
    if fallback == "gradient_checkpointing":
        enable_gradient_checkpointing(critic.backbone)
    else:  # eager attention drops out of its [B, heads, T, T] weights, the same draws in both forwards
        critic.backbone.config.attention_dropout = 0.3
    assert not runs_unpadded(critic.backbone)
    ids_B_T, attention_B_T, completion_B_T = completions([14, 6, 9], len(tokenizer), seed=5)
    assert_same_values_and_gradients(critic, ids_B_T, attention_B_T, completion_B_T, seed=6)
    assert unpadded_calls["n"] == 0
