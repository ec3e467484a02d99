"""Every family adapter (`policies/families/`) held equal to transformers' own forward and `generate`.

One tiny model per family, built from its config (hidden 64, 3 layers, 4 query heads sharing 2 key/value heads,
a 64-token vocabulary, sliding windows of 4-5 tokens where the family has them, shorter than the sequences), its
weights drawn at std 0.2 and its norm weights away from their initial values, so that a wrong offset, a missing
norm, a window off by one or a soft-cap left out shows in the logits. Expectations come from the model's own
forward (the padded batch with its mask, or packed rows by their position ids, as transformers packs them) and a
full float32 log-softmax, or from `model.generate`. Adding a family is one entry in FAMILIES.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from posttrain.policies import token_logprobs
from posttrain.policies.families import FAMILIES, describe_forward_path, family_of
from posttrain.policies.unpadded import runs_unpadded
from posttrain.rollout import ENGINES, SamplingParams
from posttrain.rollout.decoders import (
    GraphedDecoder,
    HFCacheDecoder,
    StaticCacheDecoder,
    build_decoder,
    supports_static,
)
from posttrain.rollout.native import left_pad

VOCAB, WIDTH = 64, 14
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
GEMMA_SHAPE = dict(head_dim=16, query_pre_attn_scalar=24)  # a score scale other than head_dim^-1/2
SLIDING = ["sliding_attention", "full_attention", "sliding_attention"]

# fmt: off
FAMILIES_UNDER_TEST = {
    "llama": lambda: transformers.LlamaConfig(**SHAPE, attention_bias=True),
    "mistral": lambda: transformers.MistralConfig(**SHAPE, sliding_window=5),
    "qwen2": lambda: transformers.Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "qwen3": lambda: transformers.Qwen3Config(**SHAPE, head_dim=16, use_sliding_window=True, sliding_window=4,
                                              layer_types=SLIDING),
    "gemma": lambda: transformers.GemmaConfig(**SHAPE, head_dim=16),
    "gemma2": lambda: transformers.Gemma2Config(**SHAPE, **GEMMA_SHAPE, sliding_window=4, attn_logit_softcapping=4.0,
                                                final_logit_softcapping=3.0),
    "gemma3": lambda: transformers.Gemma3TextConfig(**SHAPE, **GEMMA_SHAPE, layer_types=SLIDING, sliding_window=4,
                                                    final_logit_softcapping=3.0),
    "phi3": lambda: transformers.Phi3Config(**SHAPE, sliding_window=5, partial_rotary_factor=0.5),
    "olmo2": lambda: transformers.Olmo2Config(**SHAPE),
    "mixtral": lambda: transformers.MixtralConfig(**SHAPE, sliding_window=5, num_local_experts=4,
                                                  num_experts_per_tok=2),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**SHAPE, use_sliding_window=True, sliding_window=4,
                                                     max_window_layers=3, num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                                     mlp_only_layers=[1]),
}
# fmt: on
"""Family -> the config of its tiny test model. Windows shorter than WIDTH; biases on Llama's projections; Phi-3's
RoPE on half of each head; Gemma 2's attention and final soft-caps; 4 experts, 2 per token, and (Qwen2-MoE) a
shared expert and a dense layer."""


def build(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    config = FAMILIES_UNDER_TEST[family]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            elif "norm" in name:  # Gemma's (1 + w) norms start at w = 0, the others' at w = 1
                start = 0.0 if "gemma" in family else 1.0
                param.copy_(start - 0.5 + torch.rand(param.shape, generator=generator))
    return model


@pytest.fixture(scope="module", params=list(FAMILIES_UNDER_TEST))
def family(request) -> str:
    return request.param


def test_every_adapter_is_under_test() -> None:
    assert {f.name for f in FAMILIES.values()} == set(FAMILIES_UNDER_TEST)


# ---------------------------------------------------------------- training forward


def hf_logprobs(model, ids_B_T, target_B_T, **forward) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's forward, a full float32 log-softmax of its logits; values [B, T] at the targets (the logits at
    t - 1 predict token t), zeros elsewhere."""
    logits_B_T_V = model(input_ids=ids_B_T, use_cache=False, **forward).logits.float()
    logp_B_T_V = torch.log_softmax(logits_B_T_V, dim=-1)
    logp_B_T = torch.zeros(ids_B_T.shape)
    logp_B_T[:, 1:] = logp_B_T_V[:, :-1].gather(2, ids_B_T[:, 1:, None]).squeeze(2)
    entropy_B_T = torch.zeros(ids_B_T.shape)
    entropy_B_T[:, 1:] = -(logp_B_T_V.exp() * logp_B_T_V).sum(-1)[:, :-1]
    return torch.where(target_B_T, logp_B_T, 0.0), torch.where(target_B_T, entropy_B_T, 0.0)


def weighted_loss(logp_B_T, entropy_B_T) -> torch.Tensor:
    # distinct weights per position, and the entropy too, so that every gradient path is exercised
    weights_T = torch.linspace(0.5, 1.5, logp_B_T.shape[1])
    return (logp_B_T * weights_T).sum() + 0.3 * (entropy_B_T * weights_T.flip(0)).sum()


def grads(model) -> dict[str, torch.Tensor]:
    found = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad()
    return found


def right_padded() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, dict]:
    """Rows of 14, 3, 9 and 6 real tokens, right-padded; targets: real tokens after the first two."""
    ids_B_T = torch.randint(3, VOCAB, (4, WIDTH), generator=torch.Generator().manual_seed(1))
    real_B_T = torch.arange(WIDTH)[None] < torch.tensor([14, 3, 9, 6])[:, None]
    target_B_T = real_B_T & (torch.arange(WIDTH)[None] >= 2)
    return ids_B_T, real_B_T, target_B_T, None, {"attention_mask": real_B_T.long()}


def packed() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Row 0: documents of 8, 1 and 5 tokens; row 1: 3 and 11 (longer than every window). transformers splits
    rows where their position ids restart and attends within each document."""
    positions_B_T = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in ([8, 1, 5], [3, 11])])
    ids_B_T = torch.randint(3, VOCAB, (2, WIDTH), generator=torch.Generator().manual_seed(3))
    real_B_T = torch.ones(2, WIDTH, dtype=torch.bool)
    return ids_B_T, real_B_T, positions_B_T > 0, positions_B_T, {"position_ids": positions_B_T}


def grouped() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, dict]:
    """GRPO-shaped rows: a 6-token prompt with 3 completions (of 7, 2 and 8 tokens; the third repeats the first's
    first 3), right-padded; targets are the completion tokens. The unpadded forward computes the prompt once."""
    gen = torch.Generator().manual_seed(17)
    prompt, common = torch.randint(3, VOCAB, (6,), generator=gen), torch.randint(3, VOCAB, (3,), generator=gen)
    completions = [torch.cat([common, torch.randint(3, VOCAB, (4,), generator=gen)]),
                   torch.randint(3, VOCAB, (2,), generator=gen),
                   torch.cat([common, torch.randint(3, VOCAB, (5,), generator=gen)])]  # fmt: skip
    ids_B_T, real_B_T = torch.zeros(3, WIDTH, dtype=torch.long), torch.zeros(3, WIDTH, dtype=torch.bool)
    target_B_T = torch.zeros(3, WIDTH, dtype=torch.bool)
    for b, completion in enumerate(completions):
        row = torch.cat([prompt, completion])
        ids_B_T[b, : len(row)], real_B_T[b, : len(row)], target_B_T[b, len(prompt) : len(row)] = row, True, True
    return ids_B_T, real_B_T, target_B_T, None, {"attention_mask": real_B_T.long()}


@pytest.mark.parametrize("layout", [right_padded, packed, grouped], ids=["padded", "packed", "grouped"])
def test_training_log_probs_entropies_and_gradients_equal_the_models_forward(family, layout, unpadded_calls) -> None:
    model = build(family)
    ids_B_T, real_B_T, target_B_T, positions_B_T, forward = layout()
    assert runs_unpadded(model)
    logp, entropy = token_logprobs(model, ids_B_T, real_B_T, target_B_T, position_ids_B_T=positions_B_T)
    weighted_loss(logp, entropy).backward()
    fast = grads(model)
    assert unpadded_calls["n"] == 1
    ref_logp, ref_entropy = hf_logprobs(model, ids_B_T, target_B_T, **forward)
    weighted_loss(ref_logp, ref_entropy).backward()
    plain = grads(model)
    torch.testing.assert_close(logp, ref_logp.detach(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy.detach(), atol=2e-5, rtol=1e-5)
    assert (logp[target_B_T] < 0).all()
    assert fast.keys() == plain.keys() and fast
    for name, grad in plain.items():
        # float32 sums in a different order: the tolerance scales with the gradient's size
        scale = float(grad.abs().max())
        torch.testing.assert_close(fast[name], grad, atol=2e-5 * max(scale, 1.0), rtol=1e-4, msg=name)


def test_float64_training_forward_equals_the_models_forward_per_row(family) -> None:
    # in float64 each row alone through the model's forward (no padding mask, which transformers' eager Gemma 2
    # turns into NaNs in float64): the adapters' maths to float64 rounding, where the model's own kernels allow
    if family in ("mixtral", "qwen2_moe"):
        pytest.skip("transformers' expert products (grouped_mm) take no float64")
    model = build(family, dtype=torch.float64)
    ids_B_T, real_B_T, target_B_T, _, _ = right_padded()
    with torch.no_grad():
        logp, _ = token_logprobs(model, ids_B_T, real_B_T, target_B_T)
        for b in range(len(ids_B_T)):
            length = int(real_B_T[b].sum())
            row = ids_B_T[b : b + 1, :length]
            expected, _ = hf_logprobs(model, row, target_B_T[b : b + 1, :length])
            torch.testing.assert_close(logp[b, :length], expected[0], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- decoding


def uncached_logits(model, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([prompt + continuation])).logits[0, -1].float()


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15], [16, 17, 18, 19, 20]]


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "unpacked"])
def test_static_decoder_logits_equal_the_models_forward(family, pack, monkeypatch) -> None:
    # prompts of 3, 7, 1, 5 tokens (left padding up to 6) then 6 steps, past every window; each prompt expanded
    # to 2 rows, rows 1 and 6 leaving after the second step: each row's logits equal a fresh forward of its tokens
    from posttrain.rollout import decoders

    if not pack:
        monkeypatch.setattr(decoders, "PACK_MAX_VALUES", 0)
    model = build(family)
    assert supports_static(model)
    decoder = StaticCacheDecoder(model, max_new_tokens=7)
    adapter = FAMILIES[model.config.model_type]
    packable = adapter.attention_out_norm is None and adapter.qk_norm is None and not adapter.mlp_block
    assert (decoder.packed is not None) == (pack and packable)
    with torch.no_grad():
        logits_P_V = decoder.prefill(*left_pad(PROMPTS, torch.device("cpu")))
        for p, prompt in enumerate(PROMPTS):
            torch.testing.assert_close(logits_P_V[p], uncached_logits(model, prompt, []), atol=1e-4, rtol=0)
        decoder.expand(2)
        rows = [p for p in range(4) for _ in range(2)]
        fed: list[list[int]] = [[] for _ in rows]
        gen = torch.Generator().manual_seed(0)
        for step in range(6):
            tokens_A = torch.randint(3, VOCAB, (len(rows),), generator=gen)
            logits_A_V = decoder.step(tokens_A)
            for a, token in enumerate(tokens_A.tolist()):
                fed[a].append(token)
                expected = uncached_logits(model, PROMPTS[rows[a]], fed[a])
                torch.testing.assert_close(logits_A_V[a], expected, atol=1e-4, rtol=0, msg=f"step {step} row {a}")
            if step == 1:
                keep = [a for a in range(len(rows)) if a not in (1, 6)]
                decoder.select(torch.tensor(keep))
                rows, fed = [rows[a] for a in keep], [fed[a] for a in keep]


def test_the_graph_ready_step_equals_the_models_forward(family) -> None:
    # GraphedDecoder's step (eager on CPU: what a CUDA graph replays; every slot read under a bias, windows hidden
    # from a slot held in a tensor), rows 1 and 6 no longer returned after the second step, against fresh forwards
    model = build(family)
    graphed = GraphedDecoder(model, 7, capture=False)
    gen = torch.Generator().manual_seed(2)
    rows = [p for p in range(4) for _ in range(2)]
    fed: list[list[int]] = [[] for _ in rows]
    with torch.no_grad():
        graphed.prefill(*left_pad(PROMPTS, torch.device("cpu")))
        graphed.expand(2)
        for step in range(6):
            tokens_A = torch.randint(3, VOCAB, (len(rows),), generator=gen)
            logits_A_V = graphed.step(tokens_A)
            for a, token in enumerate(tokens_A.tolist()):
                fed[a].append(token)
                expected = uncached_logits(model, PROMPTS[rows[a]], fed[a])
                torch.testing.assert_close(logits_A_V[a], expected, atol=1e-4, rtol=0, msg=f"step {step} row {a}")
            if step == 1:
                keep = [0, 2, 3, 4, 5, 7]
                graphed.select(torch.tensor(keep))
                rows, fed = [rows[a] for a in keep], [fed[a] for a in keep]


def test_native_greedy_tokens_equal_generate(family) -> None:
    # 12 new tokens after prompts of 1-7: every windowed layer slides during the generation
    model = build(family, seed=4)
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    ours = ENGINES["native"].generate(model, PROMPTS, greedy, n=2)
    reference = ENGINES["hf"].generate(model, PROMPTS, greedy, n=2)
    assert ours.completion_ids == reference.completion_ids
    for a, b in zip(ours.logprobs, reference.logprobs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- which path runs


def test_the_path_is_reported(family) -> None:
    model = build(family)
    name = family_of(model).name
    assert describe_forward_path(model) == (
        f"forward path: posttrain's layer forward ({name} adapter) for training and decoding"
    )
    model.config.attention_dropout = 0.1
    assert describe_forward_path(model.train()) == (
        f"forward path: transformers' forward for training (attention dropout while training); "
        f"posttrain's layer forward ({name} adapter) for decoding"
    )


def test_a_family_without_an_adapter_runs_transformers_forward(unpadded_calls) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2)
    gpt2 = transformers.GPT2LMHeadModel(config).eval()
    assert family_of(gpt2) is None and not runs_unpadded(gpt2) and not supports_static(gpt2)
    expected = "forward path: transformers' forward for training and decoding (no adapter for gpt2)"
    assert describe_forward_path(gpt2) == expected
    assert isinstance(build_decoder(gpt2, 4), HFCacheDecoder)
    ids_B_T, real_B_T, target_B_T, _, forward = right_padded()
    logp, entropy = token_logprobs(gpt2, ids_B_T, real_B_T, target_B_T)
    ref_logp, ref_entropy = hf_logprobs(gpt2, ids_B_T, target_B_T, **forward)
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-5, rtol=1e-5)
    assert unpadded_calls["n"] == 0


def test_what_an_adapter_cannot_reproduce_takes_transformers_forward() -> None:
    # Phi-3's residual dropout while training; Gemma 3's bidirectional variant; a decoder missing a module
    phi3 = build("phi3")
    phi3.config.resid_pdrop = 0.1
    assert runs_unpadded(phi3) and not runs_unpadded(phi3.train())
    assert "resid_pdrop" in describe_forward_path(phi3)
    bidirectional = transformers.Gemma3TextConfig(**SHAPE, **GEMMA_SHAPE, use_bidirectional_attention=True)
    gemma3 = AutoModelForCausalLM.from_config(bidirectional)
    assert not runs_unpadded(gemma3) and not supports_static(gemma3)
    assert describe_forward_path(gemma3).endswith("(bidirectional attention)")
    olmo2 = build("olmo2")
    del olmo2.model.layers[0].self_attn.q_norm
    assert describe_forward_path(olmo2).endswith("(its olmo2 decoder has no layers.0.self_attn.q_norm)")


# ---------------------------------------------------------------- mixtures of experts


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_sparse_blocks_run_posttrains_expert_products_not_their_modules(family, monkeypatch) -> None:
    # the equality tests above hold whichever computes the block; here the block's own forward may not run at all
    model = build(family)
    block_type = type(next(layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts")))

    def refuse(*args, **kwargs):
        raise AssertionError(f"{block_type.__name__}.forward ran")

    monkeypatch.setattr(block_type, "forward", refuse)
    ids_B_T, real_B_T, target_B_T, _, _ = right_padded()
    logp, _ = token_logprobs(model, ids_B_T, real_B_T, target_B_T)
    logp.sum().backward()
    decoder = StaticCacheDecoder(model, max_new_tokens=2)
    with torch.no_grad():
        decoder.prefill(*left_pad(PROMPTS, torch.device("cpu")))
        decoder.step(torch.tensor([3, 4, 5, 6]))
    assert all(p.grad is not None for n, p in model.named_parameters() if "experts" in n)


@pytest.mark.parametrize("normalised", [True, False], ids=["norm_topk_prob", "raw_top_k"])
def test_expert_products_equal_a_loop_over_each_tokens_experts(normalised) -> None:
    # y(x) = sum over x's top-2 experts e of p_e(x) down_e(silu(gate_e x) * up_e x) + sigmoid(g x) shared(x), with
    # p the router's softmax, renormalised over the two where norm_topk_prob; computed token by token
    from posttrain.policies.decoder_layer import experts_op

    config = FAMILIES_UNDER_TEST["qwen2_moe"]()
    config.norm_topk_prob = normalised
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        block = AutoModelForCausalLM.from_config(config).model.layers[0].mlp
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn(param.shape) * 0.3)
    routed = experts_op(block, family_of(AutoModelForCausalLM.from_config(config)).experts, config)
    assert routed is not None
    x_X_H = torch.randn(9, config.hidden_size, generator=torch.Generator().manual_seed(6))
    bank, inter = block.experts, config.moe_intermediate_size
    expected = []
    for x_H in x_X_H:
        p_E = torch.softmax(block.gate.weight @ x_H, dim=-1)
        top = p_E.topk(2).indices
        weights = p_E[top] / p_E[top].sum() if normalised else p_E[top]
        y_H = torch.zeros(config.hidden_size)
        for w, e in zip(weights, top.tolist()):
            gate_up = bank.gate_up_proj[e] @ x_H
            y_H += w * (bank.down_proj[e] @ (torch.nn.functional.silu(gate_up[:inter]) * gate_up[inter:]))
        shared = block.shared_expert
        shared_H = shared.down_proj.weight @ (
            torch.nn.functional.silu(shared.gate_proj.weight @ x_H) * (shared.up_proj.weight @ x_H)
        )
        expected.append(y_H + torch.sigmoid(block.shared_expert_gate.weight @ x_H) * shared_H)
    with torch.no_grad():
        torch.testing.assert_close(routed(x_X_H), torch.stack(expected), atol=1e-5, rtol=1e-5)
