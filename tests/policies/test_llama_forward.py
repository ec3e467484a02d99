"""The autograd functions of the training forward that keep fewer activations than autograd's own ops
(`policies/llama_forward.py`): `SwiGLUDown` and `HalfRMSNorm`, against their formulas written out and the
modules they stand for, and what they keep for the backward."""

import pytest
import torch
import torch.nn.functional as F

from posttrain.policies import build_model, llama_forward, token_logprobs
from posttrain.policies.llama_forward import HalfRMSNorm, SwiGLUDown, gated_down_op
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
    monkeypatch.setattr(llama_forward, "SWIGLU_MIN_VALUES", 3 * 384)
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
    monkeypatch.setattr(llama_forward, "SWIGLU_MIN_VALUES", 0)
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
