"""The unpadded training forward (`policies/unpadded.py`) against the model's own forward: documents by hand, and
the cases beyond tests/policies/test_families.py (attention kernels, oneDNN row padding, LoRA, bfloat16, RoPE
scaling, a bare decoder, the fallbacks).

Every expectation comes from the Hugging Face forward over the padded batch (`model(...)` with the mask,
or with packed position ids and no mask) and a full float32 log-softmax: log-probs, entropies and the
gradients of every parameter must agree, and the fallbacks must be taken where the unpadded forward
would not reproduce the model.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from posttrain.policies import build_model, enable_gradient_checkpointing, hidden_states_at, token_logprobs
from posttrain.policies.families import decoder_of
from posttrain.policies.unpadded import find_documents, products_pad_rows, runs_unpadded
from posttrain.tasks import build_builtin_tokenizer

WIDTH = 14


@pytest.fixture(scope="module")
def tokenizer():
    return build_builtin_tokenizer("arithmetic")


def sharp_model(preset: str, tokenizer, *, seed: int, attention: str = "sdpa") -> torch.nn.Module:
    """A preset (4 query heads sharing 2 key/value heads) with weights drawn at std 0.2 instead of 0.02, so
    that attention is far from uniform and a token that sees the wrong keys or angles shows in the logits,
    and RMSNorm weights between 0.5 and 1.5 instead of all 1, so that their gradients are not all alike."""
    model = build_model(preset, tokenizer, seed=seed)
    model.set_attn_implementation(attention)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            elif "norm" in name:
                param.copy_(0.5 + torch.rand(param.shape, generator=generator))
    return model


def hf_logprobs(model, ids_B_T, target_B_T, **forward) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain path: the model's forward over the padded batch, full float32 log-softmax, values [B, T]
    at the targets (the logits at t - 1 predict token t), zeros elsewhere."""
    logits_B_T_V = model(input_ids=ids_B_T, use_cache=False, **forward).logits.float()
    logp_B_T_V = torch.log_softmax(logits_B_T_V, dim=-1)
    logp_B_T = torch.zeros(ids_B_T.shape)
    logp_B_T[:, 1:] = logp_B_T_V[:, :-1].gather(2, ids_B_T[:, 1:, None]).squeeze(2)
    entropy_B_T = torch.zeros(ids_B_T.shape)
    entropy_B_T[:, 1:] = -(logp_B_T_V.exp() * logp_B_T_V).sum(-1)[:, :-1]
    return logp_B_T * target_B_T, entropy_B_T * target_B_T


def weighted_loss(logp_B_T, entropy_B_T) -> torch.Tensor:
    # distinct weights per position, and the entropy too, so that every gradient path is exercised
    weights_T = torch.linspace(0.5, 1.5, logp_B_T.shape[1])
    return (logp_B_T * weights_T).sum() + 0.3 * (entropy_B_T * weights_T.flip(0)).sum()


def grads(model) -> dict[str, torch.Tensor]:
    found = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return found


def assert_same_values_and_gradients(model, ids_B_T, attention_B_T, target_B_T, position_ids_B_T, forward):
    """token_logprobs against the plain path `hf_logprobs(**forward)`: values, entropies, all gradients."""
    model.zero_grad()
    logp, entropy = token_logprobs(model, ids_B_T, attention_B_T, target_B_T, position_ids_B_T=position_ids_B_T)
    weighted_loss(logp, entropy).backward()
    fast = grads(model)
    ref_logp, ref_entropy = hf_logprobs(model, ids_B_T, target_B_T, **forward)
    weighted_loss(ref_logp, ref_entropy).backward()
    plain = grads(model)
    torch.testing.assert_close(logp, ref_logp.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy.detach(), atol=1e-5, rtol=1e-5)
    assert (logp[target_B_T] < 0).all()
    assert fast.keys() == plain.keys() and fast
    for name, grad in plain.items():
        # float32 sums in a different order: gradients reach ~50 with these weights, so the tolerance scales
        scale = float(grad.abs().max())
        torch.testing.assert_close(fast[name], grad, atol=1e-5 * max(scale, 1.0), rtol=1e-4, msg=name)


def right_padded(lengths: list[int], vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ids [B, WIDTH] with rows of `lengths` real tokens; targets: real tokens after the first two."""
    ids_B_T = torch.randint(3, vocab, (len(lengths), WIDTH), generator=torch.Generator().manual_seed(seed))
    attention_B_T = torch.arange(WIDTH)[None] < torch.tensor(lengths)[:, None]
    target_B_T = attention_B_T.clone()
    target_B_T[:, :2] = False
    return ids_B_T, attention_B_T, target_B_T


# ---------------------------------------------------------------- documents, by hand


def test_find_documents_by_hand() -> None:
    # row 0: documents of 3 and 2 tokens, 1 padding; row 1: one document of 4 tokens, 2 padding
    # (row 1's padding continues the positions; the mask, not the positions, says it is padding)
    ids = torch.arange(12).view(2, 6)  # no row repeats another's tokens
    real = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    docs = find_documents(ids, real, positions)
    # real tokens at flat indices 0..4 (row 0) and 6..9 (row 1); Tmax = 4, documents 0, 1, 2 at slots 0, 4, 8
    assert docs.token_U.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert docs.slot_U.tolist() == docs.kv_slot_N.tolist() == [0, 1, 2, 4, 5, 8, 9, 10, 11]
    assert docs.kv_source_N is None
    assert (docs.num_docs, docs.max_len) == (3, 4)
    # without position ids each row is one document: Tmax = 5, rows at slots 0 and 5
    docs = find_documents(ids, real, None)
    assert docs.slot_U.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert (docs.num_docs, docs.max_len) == (2, 5)
    assert find_documents(ids, torch.zeros(2, 3, dtype=torch.bool), None) is None


def test_find_documents_computes_a_repeated_prefix_once() -> None:
    # row 1 repeats row 0's first 2 tokens; row 2 repeats row 1's first 3 (so row 0's first 2 through row 1);
    # row 3 differs at column 0; row 4 repeats row 3 whole, padding aside (row 3 has 3 real tokens)
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 0], [5, 6, 9, 4], [1, 6, 9, 4], [1, 6, 9, 3]])
    real = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    docs = find_documents(ids, real, None)
    # computed (flat b * 4 + t): row 0 all (0-3), row 1 column 2 (6), row 2 column 3 (11), row 3 all real
    # (12-14), row 4 column 3 (19): U = 10 of the N = 18 real tokens
    assert docs.token_U.tolist() == [0, 1, 2, 3, 6, 11, 12, 13, 14, 19]
    # slots: 5 documents of Tmax = 4, so a token's slot is its flat index (every row starts a document)
    assert docs.slot_U.tolist() == docs.token_U.tolist()
    assert docs.kv_slot_N.tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 16, 17, 18, 19]
    # each real token's key/value from U: row 1 -> 0, 1, 4; row 2 -> 0, 1, 4, 5; row 4 -> 6, 7, 8, 9
    assert docs.kv_source_N.tolist() == [0, 1, 2, 3, 0, 1, 4, 0, 1, 4, 5, 6, 7, 8, 6, 7, 8, 9]
    assert docs.index_BT[[4, 5, 6, 8, 9, 10, 11, 16, 17, 18, 19]].tolist() == [0, 1, 4, 0, 1, 4, 5, 6, 7, 8, 9]
    # different positions make different states: packed row 1 restarting at column 1 repeats row 0 at column 0 only
    positions = torch.tensor([[0, 1, 2, 3], [0, 0, 1, 2]])
    docs = find_documents(ids[:2], torch.ones(2, 4, dtype=torch.bool), positions)
    assert docs.token_U.tolist() == [0, 1, 2, 3, 5, 6, 7]
    assert find_documents(ids, real, None, share_prefixes=False).kv_source_N is None
    # 1 repeated token of 12 (8%, under MIN_SHARED_FRACTION): copying keys and values would cost more than it saves
    few = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 1, 2, 3, 4, 0]])
    assert find_documents(few, torch.ones(2, 6, dtype=torch.bool), None).kv_source_N is None


# ---------------------------------------------------------------- equal to the model's forward


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("preset", ["qwen2-small", "llama-small"])
def test_right_padded_rows_equal_the_models_forward(
    preset, attention, tokenizer, unpadded_calls, linear_kernel
) -> None:
    # rows of 14, 2, 9, 5 and 11 real tokens: most of the batch's token slots are padding in some rows. On
    # oneDNN the 41 computed tokens run as 48 rows and the last layer's 36 read ones as 48.
    model = sharp_model(preset, tokenizer, seed=0, attention=attention)
    ids, attention_B_T, target = right_padded([14, 2, 9, 5, 11], len(tokenizer), seed=1)
    assert_same_values_and_gradients(model, ids, attention_B_T, target, None, {"attention_mask": attention_B_T.long()})
    assert unpadded_calls["n"] == 1
    assert linear_kernel["padded"] == (linear_kernel["kernel"] == "onednn")


def packed_rows(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row 0: documents of 5, 1, 6 and 2 tokens (full); row 1: 3 and 7 tokens, then 4 padding whose positions
    restart (as collate_packed writes them). Returns ids, mask (bool), targets, position ids, all [2, WIDTH]."""
    docs = [[5, 1, 6, 2], [3, 7, 4]]
    positions_B_T = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in docs])
    ids_B_T = torch.randint(3, vocab, (2, WIDTH), generator=torch.Generator().manual_seed(3))
    attention_B_T = torch.ones(2, WIDTH, dtype=torch.bool)
    attention_B_T[1, 10:] = False
    target_B_T = attention_B_T & (positions_B_T > 0)  # a document's first token is never a target
    return ids_B_T, attention_B_T, target_B_T, positions_B_T


@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("preset", ["qwen2-small", "llama-small"])
def test_packed_rows_equal_the_models_packed_forward(
    preset, with_mask, tokenizer, unpadded_calls, linear_kernel
) -> None:
    # the plain path is transformers' packed forward: no mask, block-diagonal attention from the position
    # ids. Without the mask token_logprobs cannot tell the padding tail from one more document, and runs it.
    model = sharp_model(preset, tokenizer, seed=2)
    ids, attention_B_T, target, positions = packed_rows(len(tokenizer))
    mask = attention_B_T if with_mask else None
    assert_same_values_and_gradients(model, ids, mask, target, positions, {"position_ids": positions})
    assert unpadded_calls["n"] == 1
    assert linear_kernel["padded"] == (linear_kernel["kernel"] == "onednn")


def grouped_rows(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GRPO-shaped rows: prompts of 5 and 3 tokens, 3 completions each, right-padded to WIDTH. Group 0's
    completions share their first 2 tokens (and the third repeats the second's first 3); targets are the
    completion tokens, so the last prompt token's state predicts every completion's first token."""
    gen = torch.Generator().manual_seed(17)
    prompts = [torch.randint(3, vocab, (n,), generator=gen) for n in (5, 3)]
    common = torch.randint(3, vocab, (3,), generator=gen)
    completions = [
        [torch.cat([common[:2], torch.randint(3, vocab, (4,), generator=gen)]), common, torch.cat([common, common])],
        [torch.randint(3, vocab, (n,), generator=gen) for n in (9, 2, 11)],
    ]
    ids_B_T = torch.zeros(6, WIDTH, dtype=torch.long)
    attention_B_T = torch.zeros(6, WIDTH, dtype=torch.bool)
    target_B_T = torch.zeros(6, WIDTH, dtype=torch.bool)
    for b, (prompt, completion) in enumerate((p, c) for p, group in zip(prompts, completions) for c in group):
        row = torch.cat([prompt, completion])
        ids_B_T[b, : len(row)], attention_B_T[b, : len(row)] = row, True
        target_B_T[b, len(prompt) : len(row)] = True
    return ids_B_T, attention_B_T, target_B_T


@pytest.mark.parametrize("preset", ["qwen2-small", "llama-small"])
def test_rows_repeating_a_prefix_equal_the_models_forward(preset, tokenizer, unpadded_calls, linear_kernel) -> None:
    model = sharp_model(preset, tokenizer, seed=18)
    ids, attention_B_T, target = grouped_rows(len(tokenizer))
    # rows of 11, 8, 11 | 12, 5, 14 real tokens (61); repeated: 7 and 8 in group 0's rows 1 and 2, 3 and 3 in
    # group 1's: 21 of them, so 40 tokens are computed
    assert find_documents(ids, attention_B_T, None).token_U.numel() == 40
    assert_same_values_and_gradients(model, ids, attention_B_T, target, None, {"attention_mask": attention_B_T.long()})
    assert unpadded_calls["n"] == 1
    assert linear_kernel["padded"] == (linear_kernel["kernel"] == "onednn")


@pytest.mark.parametrize("rope_type", ["dynamic", "linear"])
def test_full_attention_heads_biases_and_rope_scaling(rope_type, unpadded_calls) -> None:
    # as many key/value heads as query heads, biases on every Linear, and scaled RoPE from the model's own
    # rotary module: dynamic scaling rescales once positions pass max_position_embeddings (8 < WIDTH = 14)
    torch.manual_seed(13)
    config = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=8, attention_bias=True, mlp_bias=True, initializer_range=0.3,
        rope_parameters={"rope_type": rope_type, "factor": 2.0, "rope_theta": 10000.0},
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    ids, attention_B_T, target = right_padded([14, 5, 9], 50, seed=14)
    assert_same_values_and_gradients(model, ids, attention_B_T, target, None, {"attention_mask": attention_B_T.long()})
    assert unpadded_calls["n"] == 1


def test_lora_model_equals_the_models_forward(tokenizer, unpadded_calls) -> None:
    peft = pytest.importorskip("peft")
    base = sharp_model("qwen2-small", tokenizer, seed=4)
    # random LoRA B (peft starts it at zero), so that the adapters change the outputs and get gradients
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    ids, attention_B_T, target = right_padded([14, 3, 8], len(tokenizer), seed=5)
    assert_same_values_and_gradients(model, ids, attention_B_T, target, None, {"attention_mask": attention_B_T.long()})
    assert unpadded_calls["n"] == 1


def test_lora_on_the_head_equals_the_models_forward(tokenizer, unpadded_calls) -> None:
    # a LoRA-wrapped head's weight is its frozen base's: the chunked head would drop the adapter's delta (log-probs
    # off by about 1, found by fuzzing), so such a head runs as its module
    peft = pytest.importorskip("peft")
    base = sharp_model("qwen2-small", tokenizer, seed=8)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    ids, attention_B_T, target = right_padded([14, 6, 9], len(tokenizer), seed=9)
    assert_same_values_and_gradients(model, ids, attention_B_T, target, None, {"attention_mask": attention_B_T.long()})
    assert any("lm_head.lora" in name for name, p in model.named_parameters() if p.requires_grad)


def test_a_bare_decoder_runs_unpadded_like_its_causal_lm(tokenizer, unpadded_calls, linear_kernel) -> None:
    # the PPO critic's backbone is a bare Qwen2Model: the same decoder, found from the LM or from itself
    model = sharp_model("qwen2-small", tokenizer, seed=15)
    decoder = model.model
    assert decoder_of(model) is decoder and decoder_of(decoder) is decoder
    assert runs_unpadded(decoder)
    for ids, attention_B_T, target in (right_padded([14, 3, 8], len(tokenizer), seed=16), grouped_rows(len(tokenizer))):
        hidden_M_H = hidden_states_at(decoder, ids, attention_B_T, None, target)
        expected_B_T_H = decoder(input_ids=ids, attention_mask=attention_B_T.long(), use_cache=False).last_hidden_state
        torch.testing.assert_close(hidden_M_H, expected_B_T_H[target], atol=1e-5, rtol=1e-5)
    assert unpadded_calls["n"] == 2
    assert linear_kernel["padded"] == 2 * (linear_kernel["kernel"] == "onednn")


@pytest.mark.parametrize("bf16", ["autocast", "weights"])
def test_bf16_follows_the_models_forward(bf16, tokenizer, unpadded_calls) -> None:
    # bf16 autocast (train.bf16) or bf16 weights (model.dtype): both paths make the same precision choices,
    # so they agree far more closely than bf16 agrees with float32 (here 0.17 apart at the worst token)
    model = sharp_model("llama-small", tokenizer, seed=6)
    ids, attention_B_T, target = right_padded([14, 4, 10], len(tokenizer), seed=7)
    if bf16 == "weights":
        model = model.to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 == "autocast"):
        logp, _ = token_logprobs(model, ids, attention_B_T, target)
        ref_logp, _ = hf_logprobs(model, ids, target, attention_mask=attention_B_T.long())
    assert unpadded_calls["n"] == 1
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, atol=1e-3, rtol=1e-3)


def test_bfloat16_products_on_cpu_pad_their_rows(tokenizer) -> None:
    # oneDNN, which runs every bfloat16 product on CPU, builds a kernel per row count: rows go to a bucket
    from posttrain.policies import cpu_matmul

    model = build_model("qwen2-small", tokenizer, seed=0)
    q_proj = decoder_of(model).layers[0].self_attn.q_proj
    x = torch.zeros(7, q_proj.in_features)
    assert products_pad_rows(q_proj, x) == cpu_matmul.onednn_computes(x, q_proj.weight)  # float32: as oneDNN
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert products_pad_rows(q_proj, x)
    half = model.to(torch.bfloat16)
    assert products_pad_rows(decoder_of(half).layers[0].self_attn.q_proj, x.bfloat16())


# ---------------------------------------------------------------- fallbacks


def test_left_padding_takes_the_models_forward(tokenizer, unpadded_calls) -> None:
    model = sharp_model("qwen2-small", tokenizer, seed=8)
    ids = torch.randint(3, len(tokenizer), (2, 8), generator=torch.Generator().manual_seed(9))
    attention_B_T = torch.ones(2, 8, dtype=torch.long)
    attention_B_T[1, :3] = 0
    positions = (attention_B_T.cumsum(-1) - 1).clamp(min=0)
    target = attention_B_T.bool() & (positions > 1)
    forward = {"attention_mask": attention_B_T, "position_ids": positions}
    assert_same_values_and_gradients(model, ids, attention_B_T, target, positions, forward)
    assert unpadded_calls["n"] == 0


@pytest.mark.parametrize("packed", [False, True])
def test_gradient_checkpointing_takes_the_models_forward(packed, tokenizer, unpadded_calls) -> None:
    # the model's own forward, given no mask for right padding (and packed rows split by their positions)
    model = sharp_model("llama-small", tokenizer, seed=10)
    enable_gradient_checkpointing(model)
    assert not runs_unpadded(model)
    if packed:
        ids, attention_B_T, target, positions = packed_rows(len(tokenizer))
        forward = {"position_ids": positions}
    else:
        (ids, attention_B_T, target), positions = right_padded([14, 6], len(tokenizer), seed=11), None
        forward = {"attention_mask": attention_B_T.long()}
    assert_same_values_and_gradients(model, ids, attention_B_T, target, positions, forward)
    assert unpadded_calls["n"] == 0


def test_what_the_unpadded_forward_would_not_reproduce_is_refused(tokenizer) -> None:
    model = sharp_model("qwen2-small", tokenizer, seed=12)
    assert runs_unpadded(model)
    model.config.attention_dropout = 0.1
    assert not runs_unpadded(model.train())
    assert runs_unpadded(model.eval())  # no dropout at evaluation
    model.config.attention_dropout = 0.0
    # a hook on a Linear the compact forward calls as plain maths would not run (FSDP gathers weights so)
    handle = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda module, args, out: out)
    assert not runs_unpadded(model)
    handle.remove()
    model.set_attn_implementation("flex_attention")
    assert not runs_unpadded(model)
    model.set_attn_implementation("sdpa")
    assert runs_unpadded(model)
