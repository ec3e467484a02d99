"""oneDNN float32 linear layers (`policies/cpu_matmul.py`) against F.linear and the model's own forward.

The expectations come from float64 F.linear and autograd (values and gradients), or from the Hugging Face
forward with its own nn.Linear layers; routing is checked by counting the oneDNN calls.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from posttrain.policies import build_model, cpu_matmul, token_logprobs
from posttrain.rollout.decoders import StaticCacheDecoder
from posttrain.rollout.native import left_pad
from posttrain.tasks import build_builtin_tokenizer

needs_onednn = pytest.mark.skipif(not cpu_matmul.onednn_available(), reason="no oneDNN linear in this build")


@pytest.fixture
def kernel(monkeypatch):
    """Choose the kernel through POSTTRAIN_CPU_MATMUL for one test; counts the oneDNN calls."""
    calls = {"n": 0}
    original = cpu_matmul.onednn_product

    def counting(*args):
        calls["n"] += 1
        return original(*args)

    monkeypatch.setattr(cpu_matmul, "onednn_product", counting)

    def choose(choice: str) -> dict:
        monkeypatch.setenv(cpu_matmul.ENV_VAR, choice)
        cpu_matmul.onednn_selected.cache_clear()
        cpu_matmul.bound_kernel_caches.cache_clear()
        return calls

    yield choose
    cpu_matmul.onednn_selected.cache_clear()


def float64_linear(x, weight, bias, grad_out):
    """Values and gradients of x, weight, bias for the loss sum(y * grad_out), in float64."""
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    y = F.linear(x64, w64, b64)
    (y * grad_out.double()).sum().backward()
    return y, x64.grad, w64.grad, b64.grad


@needs_onednn
@pytest.mark.parametrize("out_features, in_features", [(320, 288), (288, 320)])  # both orders of dW's operands
def test_values_and_gradients_equal_float64(kernel, out_features, in_features):
    calls = kernel("onednn")
    gen = torch.Generator().manual_seed(0)
    # x is a non-contiguous [3, 100, K] view (every other column); its 300 rows are padded to 304 in all three
    # products
    x = torch.randn(3, 100, 2 * in_features, generator=gen)[..., ::2].requires_grad_()
    weight = (torch.randn(out_features, in_features, generator=gen) / 10).requires_grad_()
    bias = torch.randn(out_features, generator=gen).requires_grad_()
    grad_out = torch.randn(3, 100, out_features, generator=gen)
    y = cpu_matmul.linear(x, weight, bias)
    (y * grad_out).sum().backward()
    assert calls["n"] == 3  # forward, d/dx, d/dW
    ref_y, ref_x, ref_w, ref_b = float64_linear(x, weight, bias, grad_out)
    torch.testing.assert_close(y.double(), ref_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weight.grad.double(), ref_w, atol=1e-4, rtol=1e-5)  # sums over 300 rows
    torch.testing.assert_close(bias.grad.double(), ref_b, atol=1e-4, rtol=1e-5)
    assert weight.grad.is_contiguous()


def test_rows_are_padded_to_a_bucket():
    # 100 rows -> 112 (multiple of 16), 300 -> 304 (16 under 512), 522 -> 544 (32 under 1,024),
    # 2000 -> 2048 (64 under 2,048: 2000 has 11 bits, 2^(11-5) = 64), 7000 -> 7168 (256), 320 stays
    x = torch.arange(300.0).view(100, 3)
    padded = cpu_matmul.padded_rows(x)
    assert padded.shape == (112, 3) and (padded[:100] == x).all() and (padded[100:] == 0).all()
    assert [cpu_matmul.padded_count(n) for n in (1, 16, 300, 522, 1024, 2000, 7000)] == [
        16, 16, 304, 544, 1024, 2048, 7168,
    ]  # fmt: skip
    assert cpu_matmul.padded_rows(torch.ones(300, 2)).shape == (304, 2)
    same = torch.ones(320, 2)
    assert cpu_matmul.padded_rows(same) is same


@needs_onednn
def test_only_the_gradients_asked_for_are_computed(kernel):
    calls = kernel("onednn")
    x = torch.randn(64, 256)
    weight = torch.randn(512, 256, requires_grad=True)  # a frozen input: no d/dx
    cpu_matmul.linear(x, weight).sum().backward()
    assert calls["n"] == 2
    # the sum's gradient is all ones, so dW[n, k] = sum over rows of x[:, k]
    torch.testing.assert_close(weight.grad, x.sum(0).expand(512, -1), atol=1e-4, rtol=1e-5)


@needs_onednn
def test_without_gradients_no_graph_is_built(kernel):
    calls = kernel("onednn")
    weight = torch.randn(256, 256, requires_grad=True)
    with torch.no_grad():
        y = cpu_matmul.linear(torch.randn(64, 256), weight)
    assert y.grad_fn is None and calls["n"] == 1


@needs_onednn
def test_what_onednn_does_not_take_goes_to_f_linear(kernel):
    calls = kernel("onednn")
    weight = torch.randn(256, 256)
    cpu_matmul.linear(torch.randn(4, 256), weight)  # fewer than MIN_ROWS rows
    cpu_matmul.linear(torch.randn(64, 128), torch.randn(256, 128))  # under MIN_MULTIPLY_ADDS
    cpu_matmul.linear(torch.randn(512, 128), torch.randn(128, 128))  # 8.4M multiply-adds, under MIN_WEIGHT_VALUES
    cpu_matmul.linear(torch.randn(64, 256, dtype=torch.float64), weight.double())
    cpu_matmul.linear(torch.randn(64, 256, dtype=torch.bfloat16), weight.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cpu_matmul.linear(torch.randn(64, 256), weight)
    assert calls["n"] == 0
    cpu_matmul.linear(torch.randn(64, 256), weight)
    assert calls["n"] == 1


@needs_onednn
def test_a_bound_linear_checks_only_where_onednn_can_take_it(kernel):
    # under MIN_WEIGHT_VALUES, another dtype or with BLAS chosen the bound function is F.linear itself; a large
    # float32 weight on oneDNN keeps the per-call row checks: 4 rows go to F.linear, 64 rows to oneDNN
    calls = kernel("onednn")
    small, large = torch.randn(128, 128), torch.randn(256, 256)
    for weight in (small, large.double()):
        assert cpu_matmul.linear_of(weight).func is F.linear
    bound = cpu_matmul.linear_of(large, torch.randn(256))
    assert bound.func is cpu_matmul.linear
    x = torch.randn(64, 256)
    torch.testing.assert_close(bound(x), F.linear(x, large, bound.keywords["bias_N"]), atol=1e-4, rtol=1e-5)
    bound(torch.randn(4, 256))
    assert calls["n"] == 1
    kernel("blas")
    assert cpu_matmul.linear_of(large).func is F.linear


@needs_onednn
def test_kernel_caches_are_bounded_unless_the_environment_says(kernel, monkeypatch):
    for name in cpu_matmul.KERNEL_CACHE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    kernel("onednn")
    assert cpu_matmul.onednn_selected()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(cpu_matmul.KERNEL_CACHE_ENTRIES)
    assert os.environ["LRU_CACHE_CAPACITY"] == "7"


def test_kernel_caches_are_bounded_before_a_bfloat16_product_or_a_run(kernel, monkeypatch):
    # PyTorch runs bfloat16 products on oneDNN whatever POSTTRAIN_CPU_MATMUL says, so the caps are set before the
    # first product of the compact forwards (which bind products with linear_of) and at the start of every run
    from posttrain.trainers.build import check_environment

    kernel("blas")
    for name in cpu_matmul.KERNEL_CACHE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    cpu_matmul.linear_of(torch.randn(8, 8, dtype=torch.bfloat16))
    assert all(os.environ[name] == str(cpu_matmul.KERNEL_CACHE_ENTRIES) for name in cpu_matmul.KERNEL_CACHE_VARIABLES)
    for name in cpu_matmul.KERNEL_CACHE_VARIABLES:
        monkeypatch.delenv(name)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")
    cpu_matmul.bound_kernel_caches.cache_clear()  # a new process, as far as the caps go
    check_environment()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "128"
    assert os.environ["LRU_CACHE_CAPACITY"] == str(cpu_matmul.KERNEL_CACHE_ENTRIES)


def test_blas_keeps_f_linear(kernel):
    calls = kernel("blas")
    cpu_matmul.linear(torch.randn(512, 512), torch.randn(512, 512))
    assert calls["n"] == 0 and not cpu_matmul.onednn_selected()


def test_an_unknown_choice_is_named(kernel):
    kernel("fast")
    expected = "POSTTRAIN_CPU_MATMUL='fast' is not one of auto, onednn, blas"
    with pytest.raises(cpu_matmul.KernelChoiceError, match=expected):
        cpu_matmul.onednn_selected()


@needs_onednn
def test_auto_measures_once_per_process(kernel, monkeypatch):
    kernel("auto")
    probes = {"n": 0}

    def probe() -> bool:
        probes["n"] += 1
        return True

    monkeypatch.setattr(cpu_matmul, "_onednn_is_faster", probe)
    assert cpu_matmul.onednn_selected() and cpu_matmul.onednn_selected()
    assert probes["n"] == 1


# ---------------------------------------------------------------- through the model


@pytest.fixture(scope="module")
def tokenizer():
    return build_builtin_tokenizer("arithmetic")


@needs_onednn
def test_training_forward_on_onednn_equals_the_models_forward(kernel, tokenizer):
    # qwen2-base (hidden 256, MLP 768, 4 key/value heads of 32) over 8 rows of 24 tokens: every product but
    # k and v ([256, 128]) goes to oneDNN, the language-model head's too
    calls = kernel("onednn")
    model = build_model("qwen2-base", tokenizer, seed=0)
    ids_B_T = torch.randint(3, len(tokenizer), (8, 24), generator=torch.Generator().manual_seed(1))
    target_B_T = torch.ones(8, 24, dtype=torch.bool)
    target_B_T[:, :4] = False
    logp, entropy = token_logprobs(model, ids_B_T, torch.ones_like(ids_B_T), target_B_T)
    (logp.sum() + 0.3 * entropy.sum()).backward()
    assert calls["n"] > 0
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logp_B_T_V = torch.log_softmax(model(input_ids=ids_B_T).logits.float(), dim=-1)[:, :-1]
    ref_logp = logp_B_T_V.gather(2, ids_B_T[:, 1:, None]).squeeze(2) * target_B_T[:, 1:]
    ref_entropy = -(logp_B_T_V.exp() * logp_B_T_V).sum(-1) * target_B_T[:, 1:]
    (ref_logp.sum() + 0.3 * ref_entropy.sum()).backward()
    torch.testing.assert_close(logp[:, 1:], ref_logp.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy[:, 1:], ref_entropy.detach(), atol=1e-5, rtol=1e-5)
    for name, param in model.named_parameters():
        scale = max(float(param.grad.abs().max()), 1.0)
        torch.testing.assert_close(fast[name], param.grad, atol=1e-5 * scale, rtol=1e-4, msg=name)


@needs_onednn
def test_decoding_on_onednn_equals_the_models_forward(kernel, tokenizer):
    # 4 prompts x 16 rows at hidden 256: a decode step's products (64 rows) go to oneDNN
    calls = kernel("onednn")
    model = build_model("qwen2-base", tokenizer, seed=0).eval()
    prompts = [[5, 9, 11], [7, 8, 9, 10, 12], [13], [20, 21]]
    decoder = StaticCacheDecoder(model, max_new_tokens=2)
    token = torch.tensor(30)
    with torch.no_grad():
        decoder.prefill(*left_pad(prompts, torch.device("cpu")))
        decoder.expand(16)
        logits_A_V = decoder.step(token.repeat(64))
        assert calls["n"] > 0
        for p, prompt in enumerate(prompts):
            expected = model(input_ids=torch.tensor([[*prompt, 30]])).logits[0, -1]
            torch.testing.assert_close(logits_A_V[p * 16], expected, atol=1e-4, rtol=0)
