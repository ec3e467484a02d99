"""Chunked per-token log-probs and entropy: equal to the plain float32 log-softmax, values and gradients."""

import math

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from posttrain.policies import build_model, gather_logprobs_and_entropy, token_logprobs
from posttrain.policies.logprobs import is_right_padded
from posttrain.tasks import ArithmeticTask, build_tokenizer


def naive(hidden_N_H, weight_V_H, bias_V, targets_N, temperature=1.0, dtype=torch.float32):
    """The plain full-vocabulary log-softmax (float64 on request, as a tighter reference)."""
    logits_N_V = hidden_N_H.to(dtype) @ weight_V_H.to(dtype).T
    if bias_V is not None:
        logits_N_V = logits_N_V + bias_V.to(dtype)
    logp_N_V = torch.log_softmax(logits_N_V / temperature, dim=-1)
    entropy_N = -(logp_N_V.exp() * logp_N_V).sum(-1)
    return logp_N_V.gather(1, targets_N[:, None]).squeeze(1), entropy_N


def test_two_token_vocabulary_by_hand() -> None:
    # logits [0, log 3] -> p = [1/4, 3/4]; log p(1) = log 0.75 = -0.287682
    # H = -(1/4 log 1/4 + 3/4 log 3/4) = 0.25 * 1.386294 + 0.75 * 0.287682 = 0.346574 + 0.215762 = 0.562335
    hidden = torch.tensor([[1.0]])
    weight = torch.tensor([[0.0], [math.log(3.0)]])
    logp, entropy = gather_logprobs_and_entropy(hidden, weight, torch.tensor([1]), chunk=1)
    torch.testing.assert_close(logp, torch.tensor([-0.287682]), atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy, torch.tensor([0.562335]), atol=1e-6, rtol=0)
    # temperature 2: logits [0, log 3 / 2] -> p = [1, sqrt 3] / (1 + sqrt 3) = [0.366025, 0.633975]
    # log p(0) = -log(1 + sqrt 3) = -log 2.732051 = -1.005053
    logp, _ = gather_logprobs_and_entropy(hidden, weight, torch.tensor([0]), temperature=2.0, chunk=1)
    torch.testing.assert_close(logp, torch.tensor([-1.005053]), atol=1e-6, rtol=0)


def test_uniform_logits_give_log_v_entropy() -> None:
    # zero weight -> uniform over V = 7: log p = -log 7 = -1.945910, H = log 7
    logp, entropy = gather_logprobs_and_entropy(torch.randn(3, 4), torch.zeros(7, 4), torch.tensor([0, 3, 6]), chunk=3)
    torch.testing.assert_close(logp, torch.full((3,), -math.log(7)), atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy, torch.full((3,), math.log(7)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk", [1, 7, 16, 37, 100, 8192])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_equals_naive_values_and_gradients(chunk: int, temperature: float, with_bias: bool) -> None:
    # V = 37: chunks of 7 and 16 do not divide it (the last chunk is short), 37 is one chunk, 100 > V
    gen = torch.Generator().manual_seed(chunk)
    n, h, v = 11, 8, 37
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64).float() * 2
    weight = torch.randn(v, h, generator=gen).float()
    bias = torch.randn(v, generator=gen) if with_bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[0], targets[1] = 0, v - 1  # the first and last vocabulary entries
    # random upstream gradients for both outputs
    g_logp, g_ent = torch.randn(n, generator=gen), torch.randn(n, generator=gen)

    def run(fn):
        leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
        b = bias.clone().requires_grad_() if with_bias else None
        logp, ent = fn(leaves[0], leaves[1], b)
        ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
        grads = [leaves[0].grad, leaves[1].grad] + ([b.grad] if with_bias else [])
        return logp.detach(), ent.detach(), grads

    def chunked(x, w, b):
        return gather_logprobs_and_entropy(x, w, targets, bias_V=b, temperature=temperature, chunk=chunk)

    fast = run(chunked)
    # float64 reference. Logits reach |z| ~ 20 here and the entropy gradient p (z - E[z]) sums such
    # terms, so float32 round-off of the chunked backward is a few 1e-6 of the largest gradient entry;
    # a wrong formula would be off by O(1).
    slow = run(lambda x, w, b: naive(x, w, b, targets, temperature, dtype=torch.float64))
    torch.testing.assert_close(fast[0], slow[0].float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1], slow[1].float(), atol=1e-5, rtol=1e-5)
    for g_fast, g_slow in zip(fast[2], slow[2], strict=True):
        scale = g_slow.abs().max().item()
        torch.testing.assert_close(g_fast, g_slow.float(), atol=2e-5 * scale, rtol=0)


def test_gradient_of_logp_only_and_entropy_only() -> None:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 6, generator=gen)
    weight = torch.randn(13, 6, generator=gen)
    targets = torch.tensor([0, 4, 12, 7, 7])
    for pick in (0, 1):
        x1, x2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
        gather_logprobs_and_entropy(x1, weight, targets, chunk=5)[pick].sum().backward()
        naive(x2, weight, None, targets)[pick].sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)


def test_gradient_sign_raises_the_target_logit() -> None:
    # d logp / d z_target = 1 - p_target > 0: a step up the gradient on the weight raises log p(target)
    hidden = torch.tensor([[1.0, 0.0]])
    weight = torch.zeros(3, 2, requires_grad=True)
    logp, _ = gather_logprobs_and_entropy(hidden, weight, torch.tensor([2]), chunk=2)
    logp.sum().backward()
    # p = 1/3 each: grad of row 2 = (1 - 1/3) * h = [2/3, 0]; rows 0, 1 = -1/3 * h
    torch.testing.assert_close(weight.grad, torch.tensor([[-1 / 3, 0.0], [-1 / 3, 0.0], [2 / 3, 0.0]]))


def test_large_vocabulary_in_chunks_matches_naive() -> None:
    # V = 50k, N = 64, chunk 1024 (50000 = 48 * 1024 + 848: the last chunk is short)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 16, generator=gen)
    weight = (torch.randn(50_000, 16, generator=gen) * 0.5).requires_grad_()
    targets = torch.randint(0, 50_000, (64,), generator=gen)
    logp, ent = gather_logprobs_and_entropy(hidden, weight, targets, chunk=1024)
    (logp.sum() + ent.sum()).backward()
    fast_grad = weight.grad.clone()
    weight.grad = None
    ref_logp, ref_ent = naive(hidden, weight, None, targets)
    (ref_logp.sum() + ref_ent.sum()).backward()
    torch.testing.assert_close(logp, ref_logp.detach(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent.detach(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(fast_grad, weight.grad, atol=1e-5, rtol=1e-4)


def test_forward_saves_no_vocabulary_sized_activation() -> None:
    # what autograd keeps for the backward pass: inputs and [N] statistics, never an [N, V] matrix
    n, v = 8, 5000
    hidden = torch.randn(n, 4, requires_grad=True)
    weight = torch.randn(v, 4, requires_grad=True)
    saved: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, _ = gather_logprobs_and_entropy(hidden, weight, torch.zeros(n, dtype=torch.long), chunk=512)
    logp.sum().backward()
    assert saved, "expected the function to save its inputs"
    assert all(s.numel() < n * v for s in saved), saved  # the weight [V, H] is 4 * V < N * V


def test_nonpositive_temperature_is_rejected() -> None:
    with pytest.raises(ValueError, match="temperature"):
        gather_logprobs_and_entropy(torch.zeros(1, 2), torch.zeros(3, 2), torch.tensor([0]), temperature=0.0)


# ---------------------------------------------------------------- token_logprobs on real models


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(ArithmeticTask().corpus(200))


@pytest.fixture(scope="module", params=["qwen2-tiny", "llama-tiny"])
def model(request, tokenizer):
    return build_model(request.param, tokenizer, seed=0).eval()


def naive_token_logprobs(model, ids_B_T, attention_B_T):
    logits = model(input_ids=ids_B_T, attention_mask=attention_B_T).logits.float()
    logp_B_T_V = torch.log_softmax(logits, -1)
    # log p(ids[b, t] | ids[b, :t]) comes from the logits at t - 1
    logp_B_T = torch.zeros(ids_B_T.shape)
    logp_B_T[:, 1:] = logp_B_T_V[:, :-1].gather(2, ids_B_T[:, 1:, None]).squeeze(2)
    ent_B_T = torch.zeros(ids_B_T.shape)
    ent_B_T[:, 1:] = -(logp_B_T_V.exp() * logp_B_T_V).sum(-1)[:, :-1]
    return logp_B_T, ent_B_T


def test_token_logprobs_match_full_logits_at_masked_positions(model, tokenizer) -> None:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tokenizer), (3, 9), generator=gen)
    attention = torch.ones(3, 9, dtype=torch.long)
    attention[2, 6:] = 0  # right padding on row 2
    target = torch.zeros(3, 9, dtype=torch.bool)
    target[0, 4:] = True
    target[1, [1, 3, 8]] = True
    target[2, 2:6] = True
    target[:, 0] |= torch.tensor([True, False, False])  # position 0 asked for: nothing predicts it
    with torch.no_grad():
        logp, ent = token_logprobs(model, ids, attention, target, chunk=50)
        ref_logp, ref_ent = naive_token_logprobs(model, ids, attention)
    keep = target.clone()
    keep[:, 0] = False
    torch.testing.assert_close(logp[keep], ref_logp[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent[keep], ref_ent[keep], atol=1e-5, rtol=1e-5)
    assert (logp[~keep] == 0).all() and (ent[~keep] == 0).all()
    assert (logp[keep] < 0).all()


def test_token_logprobs_gradient_matches_naive(tokenizer) -> None:
    model = build_model("qwen2-tiny", tokenizer, seed=1)
    ids = torch.randint(3, len(tokenizer), (2, 6), generator=torch.Generator().manual_seed(1))
    attention = torch.ones_like(ids)
    target = torch.ones(2, 6, dtype=torch.bool)
    logp, _ = token_logprobs(model, ids, attention, target, chunk=64)
    logp.sum().backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    naive_token_logprobs(model, ids, attention)[0].sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(fast[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_chunked_head_soft_caps_logits_with_their_gradients() -> None:
    # z = cap * tanh(l / cap) / T written out in float64 and differentiated by autograd, against the chunked head
    # over chunks of 7 of a 20-token vocabulary: log-probs, entropies and the gradients of hidden, weight and bias
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(20, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(20, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 7, 13, 19, 6])
    z = 2.0 * torch.tanh((hidden @ weight.T + bias) / 2.0) / 0.7
    logp_V = torch.log_softmax(z, -1)
    ref_logp, ref_entropy = logp_V.gather(1, targets[:, None]).squeeze(1), -(logp_V.exp() * logp_V).sum(-1)
    ref_grads = torch.autograd.grad((ref_logp * 1.3 + ref_entropy * 0.4).sum(), (hidden, weight, bias))
    logp, entropy = gather_logprobs_and_entropy(hidden, weight, targets, bias_V=bias, temperature=0.7, chunk=7,
                                                softcap=2.0)  # fmt: skip
    grads = torch.autograd.grad((logp * 1.3 + entropy * 0.4).sum(), (hidden, weight, bias))
    torch.testing.assert_close(logp.double(), ref_logp, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=1e-6, rtol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_a_model_that_soft_caps_its_logits_takes_the_chunked_head_with_its_cap() -> None:
    # Gemma 2 caps its final logits in its own forward (a Llama given the same config value does not, and neither
    # does token_logprobs for it)
    torch.manual_seed(0)
    shape = dict(vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=32, initializer_range=0.5)  # fmt: skip
    gemma = Gemma2ForCausalLM(Gemma2Config(**shape, head_dim=8, final_logit_softcapping=2.0)).eval()
    llama = LlamaForCausalLM(LlamaConfig(**shape, final_logit_softcapping=2.0)).eval()
    ids = torch.randint(0, 20, (1, 5))
    target = torch.ones(1, 5, dtype=torch.bool)
    for model in (gemma, llama):
        with torch.no_grad():
            logp, _ = token_logprobs(model, ids, torch.ones_like(ids), target, chunk=8)
            logits = model(input_ids=ids).logits
            ref = torch.log_softmax(logits, -1)[0, :-1].gather(1, ids[0, 1:, None]).squeeze(1)
        torch.testing.assert_close(logp[0, 1:], ref, atol=1e-5, rtol=1e-5)
        assert logp[0, 0] == 0
    assert gemma(input_ids=ids).logits.abs().max() < 2.0


# ---------------------------------------------------------------- right padding: the mask-free path


def test_is_right_padded_by_hand() -> None:
    assert is_right_padded(torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]]))
    assert is_right_padded(torch.tensor([[True, True], [True, True]]))
    assert not is_right_padded(torch.tensor([[0, 1, 1]]))  # left padding
    assert not is_right_padded(torch.tensor([[1, 0, 1]]))  # a hole


def row_by_row(model, ids_B_T, lengths, target_B_T):
    """The straightforward reference: each row alone, unpadded, through the plain full log-softmax."""
    out = torch.zeros(ids_B_T.shape)
    for b, n in enumerate(lengths):
        logits = model(input_ids=ids_B_T[b : b + 1, :n]).logits[0].float()
        logp = torch.log_softmax(logits, -1)[:-1].gather(1, ids_B_T[b, 1:n, None]).squeeze(1)
        out[b, 1:n] = logp
    return out * target_B_T


@pytest.mark.parametrize("preset", ["qwen2-tiny", "llama-tiny"])
def test_right_padded_batch_equals_each_row_alone_values_and_gradients(preset, tokenizer) -> None:
    # rows of 9, 6 and 3 real tokens, right-padded to 9: token_logprobs drops the mask (causal attention
    # already hides every later position); values and gradients must equal the rows run one by one
    lengths = [9, 6, 3]
    ids = torch.randint(3, len(tokenizer), (3, 9), generator=torch.Generator().manual_seed(2))
    attention = (torch.arange(9)[None] < torch.tensor(lengths)[:, None]).long()
    target = attention.bool().clone()
    target[:, :2] = False
    model = build_model(preset, tokenizer, seed=3)
    logp, _ = token_logprobs(model, ids, attention, target, chunk=64)
    (logp * torch.linspace(0.5, 1.5, 9)).sum().backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = row_by_row(model, ids, lengths, target)
    (ref * torch.linspace(0.5, 1.5, 9)).sum().backward()
    torch.testing.assert_close(logp, ref.detach(), atol=1e-5, rtol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(fast[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_left_padded_batch_keeps_the_mask(tokenizer) -> None:
    # a left-padded row is not right padding: the mask stays and the values equal the row alone
    model = build_model("qwen2-tiny", tokenizer, seed=4).eval()
    ids = torch.randint(3, len(tokenizer), (2, 7), generator=torch.Generator().manual_seed(5))
    attention = torch.ones(2, 7, dtype=torch.long)
    attention[1, :3] = 0
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    target = torch.zeros(2, 7, dtype=torch.bool)
    target[:, 4:] = True
    with torch.no_grad():
        logp, _ = token_logprobs(model, ids, attention, target, position_ids_B_T=positions)
        alone = torch.log_softmax(model(input_ids=ids[1:, 3:]).logits[0].float(), -1)
    # row 1 alone is ids[1, 3:]; target t (4..6) is predicted at t - 1, i.e. index t - 4 of the unpadded row
    expected = alone[:-1].gather(1, ids[1, 4:, None]).squeeze(1)
    torch.testing.assert_close(logp[1, 4:], expected, atol=1e-5, rtol=1e-5)



def test_bfloat16_inputs_take_the_lower_precision_matmul() -> None:
    # bf16 hidden and weight: logits come from the bf16 matmul, then float32 maths; gradients come back in bf16
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(6, 8, generator=gen).bfloat16().requires_grad_()
    weight = torch.randn(20, 8, generator=gen).bfloat16().requires_grad_()
    targets = torch.tensor([0, 5, 19, 3, 3, 11])
    logp, entropy = gather_logprobs_and_entropy(hidden, weight, targets, chunk=7)
    logits = (hidden.detach() @ weight.detach().T).float()
    ref = torch.log_softmax(logits, -1)
    torch.testing.assert_close(logp, ref.gather(1, targets[:, None]).squeeze(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, -(ref.exp() * ref).sum(-1), atol=1e-5, rtol=1e-5)
    logp.sum().backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
