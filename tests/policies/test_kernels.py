"""The specialised kernels of the shared layer forward (`policies/kernels.py`) against their formulas written out
and the modules they stand for: the autograd functions that keep fewer activations than autograd's own ops
(`RMSNorm`, `HalfRMSNorm`, `SwiGLUDown`, and what they keep for the backward), and the attention kernels (short
rows, sliding windows, soft-capped scores)."""

import math

import pytest
import torch
import torch.nn.functional as F

from posttrain.policies import build_model, decoder_layer, token_logprobs
from posttrain.policies.decoder_layer import gated_down_op
from posttrain.policies.kernels import (
    HalfRMSNorm,
    RMSNorm,
    SwiGLUDown,
    causal_attention,
    causal_bias,
    grouped_attention,
    grouped_bias,
)
from posttrain.tasks import build_builtin_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_builtin_tokenizer("arithmetic")


def saved_shapes(fn) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """The shapes and dtypes of the distinct tensors autograd keeps for the backward while `fn()` runs."""
    kept: dict[int, tuple[tuple[int, ...], torch.dtype]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.setdefault(t.untyped_storage().data_ptr(), (tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return list(kept.values())


def test_swiglu_down_follows_the_formula() -> None:
    # out = (silu(g) * u) W^T + b written out with silu(g) = g / (1 + exp(-g)), differentiated by autograd in
    # float64, against SwiGLUDown's own backward; leading axes [2, 3]
    generator = torch.Generator().manual_seed(0)
    g, u = (torch.randn(2, 3, 8, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.randn(5, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=generator, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64)
    expected = (g / (1 + torch.exp(-g)) * u) @ w.T + b
    expected_grads = torch.autograd.grad(expected, (g, u, w, b), grad)
    out = SwiGLUDown.apply(g, u, lambda y: F.linear(y, w, b), w, b)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(out, (g, u, w, b), grad), expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *a: SwiGLUDown.apply(*a[:2], lambda y: F.linear(y, a[2], a[3]), *a[2:]),
                                    (g[0], u[0], w, b))  # fmt: skip
    # a frozen down weight without bias (LoRA elsewhere): gate and up still get theirs
    dg, du = torch.autograd.grad(SwiGLUDown.apply(g, u, lambda y: F.linear(y, w.detach()), w.detach(), None),
                                 (g, u), grad)  # fmt: skip
    expected_dg, expected_du = torch.autograd.grad((g / (1 + torch.exp(-g)) * u) @ w.detach().T, (g, u), grad)
    torch.testing.assert_close(dg, expected_dg, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(du, expected_du, rtol=1e-10, atol=1e-12)


def test_swiglu_down_keeps_gate_and_up_only() -> None:
    # autograd's ops keep g, silu(g), u and the product, four [X, I] tensors; SwiGLUDown two (and the weight)
    x = torch.randn(6, 4, requires_grad=True)
    gate_w, up_w, down_w = (torch.randn(*shape, requires_grad=True) for shape in ((16, 4), (16, 4), (4, 16)))
    gate, up = F.linear(x, gate_w), F.linear(x, up_w)
    fused = saved_shapes(lambda: SwiGLUDown.apply(gate, up, lambda y: F.linear(y, down_w), down_w, None))
    eager = saved_shapes(lambda: F.linear(F.silu(gate) * up, down_w))
    assert sorted(s for s, _ in fused if s == (6, 16)) == [(6, 16)] * 2
    assert sorted(s for s, _ in eager if s == (6, 16)) == [(6, 16)] * 4


def test_gated_down_takes_the_function_only_where_it_applies(tokenizer, monkeypatch) -> None:
    model = build_model("qwen2-small", tokenizer, seed=0)
    mlp = model.model.layers[0].mlp
    gate = torch.randn(3, mlp.gate_proj.out_features, requires_grad=True)
    up = torch.randn(3, mlp.up_proj.out_features)
    gated_down = gated_down_op(mlp.act_fn, mlp.down_proj)
    assert type(gated_down(gate, up).grad_fn).__name__ != "SwiGLUDownBackward"  # [3, 384]: small, autograd's ops
    monkeypatch.setattr(decoder_layer, "SWIGLU_MIN_VALUES", 3 * 384)
    assert type(gated_down(gate, up).grad_fn).__name__ == "SwiGLUDownBackward"
    with torch.no_grad():
        assert gated_down(gate, up).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast would cast the product: autograd's own ops
        assert type(gated_down(gate, up).grad_fn).__name__ != "SwiGLUDownBackward"
    mlp.act_fn = torch.nn.GELU()
    assert type(gated_down_op(mlp.act_fn, mlp.down_proj)(gate, up).grad_fn).__name__ != "SwiGLUDownBackward"


def test_half_rms_norm_equals_the_module_and_keeps_less(tokenizer) -> None:
    # the module's forward (float32 maths, rounded to bfloat16 before the weight) to the bit, its gradients to
    # bfloat16 rounding, the formula's (float64) closely; the module keeps a float32 copy of x, this x itself
    model = build_model("qwen2-small", tokenizer, seed=0).to(torch.bfloat16)
    norm = model.model.layers[0].input_layernorm
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=generator))
    x = (torch.randn(5, 7, 128, generator=generator) * 3).to(torch.bfloat16).requires_grad_(True)
    x.data[0, 0] = 0.0
    grad = torch.randn(5, 7, 128, generator=generator).to(torch.bfloat16)
    ours = HalfRMSNorm.apply(x, norm.weight, norm.variance_epsilon)
    theirs = norm(x)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert torch.equal(ours, theirs)
    dx, dw = torch.autograd.grad(ours, (x, norm.weight), grad)
    ref_dx, ref_dw = torch.autograd.grad(theirs, (x, norm.weight), grad)
    torch.testing.assert_close(dx, ref_dx, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(dw, ref_dw, atol=0.5, rtol=1e-2)  # a sum over 35 rows, rounded to bfloat16
    x64, w64 = x.detach().double().requires_grad_(True), norm.weight.detach().double().requires_grad_(True)
    formula = w64 * x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + norm.variance_epsilon)
    formula_dx, _ = torch.autograd.grad(formula, (x64, w64), grad.double())
    torch.testing.assert_close(dx.double(), formula_dx, atol=2e-2, rtol=2e-2)
    kept = saved_shapes(lambda: HalfRMSNorm.apply(x, norm.weight, norm.variance_epsilon))
    module_kept = saved_shapes(lambda: norm(x))
    assert ((5, 7, 128), torch.bfloat16) in kept and ((5, 7, 128), torch.float32) not in kept
    assert ((5, 7, 128), torch.float32) in module_kept


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_training_forward_with_both_functions_follows_the_models_gradients(dtype, tokenizer, monkeypatch) -> None:
    # a gradient through every parameter: the unpadded forward with SwiGLUDown at every size (and HalfRMSNorm in
    # bfloat16) against the model's own forward, within what rounding in another order allows
    monkeypatch.setattr(decoder_layer, "SWIGLU_MIN_VALUES", 0)
    used = []
    monkeypatch.setattr(SwiGLUDown, "forward", lambda *a, _f=SwiGLUDown.forward: used.append(1) or _f(*a))
    model = build_model("llama-small", tokenizer, seed=3).to(dtype)
    ids = torch.randint(3, len(tokenizer), (3, 12), generator=torch.Generator().manual_seed(4))
    attention = torch.arange(12)[None] < torch.tensor([12, 5, 9])[:, None]
    target = attention.clone()
    target[:, :2] = False
    logp, _ = token_logprobs(model, ids, attention, target)
    assert len(used) == len(model.model.layers)
    logp.sum().backward()
    fast = {n: p.grad.float().clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=attention.long(), use_cache=False).logits.float()
    ref = torch.log_softmax(logits, -1)[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)
    ref[~target[:, 1:]] = 0.0
    ref.sum().backward()
    torch.testing.assert_close(logp[:, 1:], ref.detach(), atol=1e-3 if dtype == torch.bfloat16 else 1e-5, rtol=1e-3)
    for name, param in model.named_parameters():
        scale = float(param.grad.float().abs().max())
        # bfloat16 gradients summed in another order: 1% of the largest entry at most here
        tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(fast[name], param.grad.float(), atol=tolerance * max(scale, 1e-3),
                                   rtol=tolerance, msg=name)  # fmt: skip


def test_rms_norm_and_its_gradients_follow_the_formula() -> None:
    # y = w * x / sqrt(mean(x^2) + eps) written out, differentiated by autograd, against RMSNorm's own backward;
    # one row of zeros (r = eps^-1/2) and one of large values
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, generator=generator, dtype=torch.float64)
    x[0, 1] = 0.0
    x[1, 2] *= 1e3
    w = 0.5 + torch.rand(16, generator=generator, dtype=torch.float64)
    grad = torch.randn(2, 3, 16, generator=generator, dtype=torch.float64)
    eps = 1e-6
    x.requires_grad_(True)
    w.requires_grad_(True)
    expected = w * x / torch.sqrt((x * x).sum(-1, keepdim=True) / 16 + eps)
    expected_dx, expected_dw = torch.autograd.grad(expected, (x, w), grad)
    y = RMSNorm.apply(x, w, eps)
    dx, dw = torch.autograd.grad(y, (x, w), grad)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, expected_dx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dw, expected_dw, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: RMSNorm.apply(a, b, eps), (x[1:], w))
    # a frozen weight (LoRA) gets no gradient; the input still does
    dx_only = torch.autograd.grad(RMSNorm.apply(x, w.detach(), eps), x, grad)[0]
    torch.testing.assert_close(dx_only, expected_dx, rtol=1e-10, atol=1e-12)


def test_causal_bias_by_hand() -> None:
    # 4 queries over 5 keys (the 5th is padding), window 2: query i sees keys i - 1 and i
    inf = float("-inf")
    assert causal_bias(4, 5, 2, torch.zeros(1)).tolist() == [
        [0, inf, inf, inf, inf], [0, 0, inf, inf, inf], [inf, 0, 0, inf, inf], [inf, inf, 0, 0, inf]
    ]  # fmt: skip
    assert causal_bias(3, 3, None, torch.zeros(1)).tolist() == [[0, inf, inf], [0, 0, inf], [0, 0, 0]]


def plain_attention(q, k, v, scale, softcap, window):
    """softmax(cap(q k^T scale) + mask) v in float64 with every key/value head repeated, the formula written out:
    query i sees keys j with i - window < j <= i; cap(s) = c tanh(s / c)."""
    q, k, v = q.double(), k.double(), v.double()
    per_kv = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(per_kv, dim=1), v.repeat_interleave(per_kv, dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    i, j = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None]
    visible = (j <= i) & ((j > i - window) if window is not None else True)
    return torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1) @ v


ROWS = [(4, 2, 1), (4, 2, 9), (4, 2, 16), (8, 8, 40), (6, 2, 64), (4, 2, 90)]


@pytest.mark.parametrize("heads, kv_heads, width", ROWS, ids=["1", "9", "16", "40-mha", "64", "90-fused"])
@pytest.mark.parametrize("softcap, window", [(None, None), (None, 3), (2.0, None), (2.0, 5)])
def test_causal_attention_follows_the_formula(heads, kv_heads, width, softcap, window, monkeypatch) -> None:
    # short float32 rows by batched products (PyTorch's fused kernel never reached), longer ones by the fused kernel
    # (unless soft-capped): both against the formula in float64, values and gradients; inputs are [S, heads, T, D]
    # views of [S, T, heads, D], as the unpadded forward lays them out
    gen = torch.Generator().manual_seed(21)
    q, k, v = (torch.randn(3, width, n, 16, generator=gen).transpose(1, 2) for n in (heads, kv_heads, kv_heads))
    grad_out = torch.randn(3, heads, width, 16, generator=gen)
    plain = [t.double().requires_grad_() for t in (q, k, v)]
    expected = plain_attention(*plain, 0.3, softcap, window)
    expected.backward(grad_out.double())
    if width <= 64:
        monkeypatch.setattr(F, "scaled_dot_product_attention", None)
    fast = [t.clone().requires_grad_() for t in (q, k, v)]
    out = causal_attention(*fast, scale=0.3, softcap=softcap, window=window)
    out.backward(grad_out)
    torch.testing.assert_close(out, expected.float(), atol=1e-5, rtol=1e-5)
    for got, want in zip(fast, plain):
        torch.testing.assert_close(got.grad, want.grad.float(), atol=1e-5, rtol=1e-5)


def test_grouped_attention_of_one_query_per_row_follows_the_formula() -> None:
    # a decode step: 3 rows, one query each, over 7 cached keys with a per-row padding bias, soft-capped
    gen = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(3, 4, 1, 8, generator=gen), torch.randn(3, 2, 7, 8, generator=gen), torch.randn(3, 2, 7, 8)
    bias_A_G_1_K = torch.zeros(3, 2, 1, 7)
    bias_A_G_1_K[1, :, :, :2] = float("-inf")  # row 1's first two slots are padding
    out = grouped_attention(q, k, v, bias_A_G_1_K.flatten(0, 1), 0.5, softcap=1.5)
    k_rep, v_rep = k.repeat_interleave(2, dim=1).double(), v.repeat_interleave(2, dim=1).double()
    scores = 1.5 * torch.tanh(q.double() @ k_rep.transpose(-1, -2) * 0.5 / 1.5) + bias_A_G_1_K.repeat_interleave(2, 1)
    torch.testing.assert_close(out, (torch.softmax(scores, -1) @ v_rep).float(), atol=1e-6, rtol=1e-6)
    # a prefill's per-row mask in the grouped layout: [A, 1, T, L] -> [A * G, (N / G) * T, L]
    mask = torch.arange(6.0).view(2, 1, 1, 3).expand(2, 1, 2, 3)
    grouped = grouped_bias(mask, groups=2, per_group=3)
    assert grouped.shape == (4, 6, 3) and torch.equal(grouped[3], mask[1, 0].repeat(3, 1))
