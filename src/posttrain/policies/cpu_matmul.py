"""Float32 linear layers on CPU through oneDNN, where that is the faster kernel.

PyTorch's CPU wheels send a float32 `mm` to Intel MKL, which on AMD processors does not use AVX-512, where
oneDNN's matmul (shipped inside PyTorch for its mkldnn ops) runs about twice as fast (bench/RESULTS.md,
"Kernels"). Both are IEEE float32 products and sums; only the order of the additions differs. On Intel
processors the two run close, so which one to use is measured once per process (`onednn_selected`), and the
environment variable POSTTRAIN_CPU_MATMUL=auto|onednn|blas overrides the measurement.

`linear` is F.linear with that choice made; the model's own modules are left alone, so a forward through them
(a family without an adapter, LoRA layers) runs as before. tests/policies/test_cpu_matmul.py holds outputs and
gradients equal to F.linear.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

ENV_VAR = "POSTTRAIN_CPU_MATMUL"
CHOICES = ("auto", "onednn", "blas")
# oneDNN's set-up and row padding cost more than it saves on small products (bench/RESULTS.md, "Kernels"): it
# takes products of at least MIN_ROWS rows and MIN_MULTIPLY_ADDS multiply-adds, of weights of MIN_WEIGHT_VALUES
MIN_ROWS = 16
MIN_MULTIPLY_ADDS = 4 << 20
# oneDNN builds and caches a kernel for every shape: its caches are capped, rows padded to a bucket of 1/32 to 1/16
# of their count (`padded_count`) to bound the shapes, and weights as small as the demo model's, which would rebuild
# their kernels every step under the cap, stay on MKL (RESULTS.md, "Kernels").
MIN_WEIGHT_VALUES = 1 << 16
MIN_ROW_BUCKET = 16
KERNEL_CACHE_ENTRIES = 32
KERNEL_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
# oneDNN is chosen when it takes at most this share of MKL's time on the probe, so that a near tie on
# some other processor keeps the default BLAS.
REQUIRED_SPEEDUP = 1.25


class KernelChoiceError(ValueError):
    """POSTTRAIN_CPU_MATMUL names no kernel, or one this PyTorch build lacks."""


def linear(x_X_K: Tensor, weight_N_K: Tensor, bias_N: Tensor | None = None) -> Tensor:
    """x @ weight.T + bias over any leading axes of x, as F.linear; oneDNN computes it where it applies."""
    if not _onednn_applies(x_X_K, weight_N_K, bias_N):
        return F.linear(x_X_K, weight_N_K, bias_N)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x_X_K, weight_N_K, bias_N)):
        return _OneDNNLinear.apply(x_X_K, weight_N_K, bias_N)
    return _onednn_linear(x_X_K, weight_N_K, bias_N)


def linear_of(weight_N_K: Tensor, bias_N: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """`linear` with its weight and bias bound, as a function of x: F.linear itself wherever oneDNN never takes
    the product (a weight off the CPU, not float32 or under MIN_WEIGHT_VALUES values, or oneDNN not selected in
    this process), so that such a call makes no checks."""
    bound_kernel_caches()  # before the first product: in bfloat16 on CPU PyTorch itself runs them on oneDNN
    on_cpu_float32 = weight_N_K.device.type == "cpu" and weight_N_K.dtype == torch.float32
    if not on_cpu_float32 or weight_N_K.numel() < MIN_WEIGHT_VALUES or not onednn_selected():
        return functools.partial(F.linear, weight=weight_N_K, bias=bias_N)
    return functools.partial(linear, weight_N_K=weight_N_K, bias_N=bias_N)


def linear_into(out_X_N: Tensor, x_X_K: Tensor, weight_N_K: Tensor) -> Tensor:
    """x @ weight.T written into `out` (no autograd): a oneDNN product copied in where oneDNN applies, since
    it has no output argument, else `torch.mm` straight into `out`. Returns `out`."""
    if _onednn_applies(x_X_K, weight_N_K, None):
        return out_X_N.copy_(_onednn_linear(x_X_K, weight_N_K))
    return torch.mm(x_X_K, weight_N_K.T, out=out_X_N)


def onednn_computes(x_X_K: Tensor, weight_N_K: Tensor) -> bool:
    """Whether `linear(x, weight)` runs on oneDNN, so over x's rows padded to `padded_count` of them."""
    return _onednn_applies(x_X_K, weight_N_K, None)


def rows_best_padded(x_X_K: Tensor, weight_N_K: Tensor) -> bool:
    """Whether products of x with `weight` are better computed over rows padded to `padded_count`: oneDNN, which
    builds a kernel for every row count it sees, runs them. It runs the float32 products that `linear` sends to
    it (`onednn_computes`) and, PyTorch sending them there itself, every bfloat16 product on CPU (bfloat16
    weights, or bfloat16 autocast): a new row count at every step costs a kernel build (RESULTS.md, "Kernels")."""
    if x_X_K.device.type != "cpu":
        return False
    autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    return weight_N_K.dtype == torch.bfloat16 or autocast_bf16 or onednn_computes(x_X_K, weight_N_K)


def _onednn_applies(x_X_K: Tensor, weight_N_K: Tensor, bias_N: Tensor | None) -> bool:
    if x_X_K.device.type != "cpu" or x_X_K.dtype != torch.float32 or weight_N_K.dtype != torch.float32:
        return False
    if bias_N is not None and bias_N.dtype != torch.float32:
        return False
    rows = x_X_K.numel() // max(x_X_K.shape[-1], 1)
    values = weight_N_K.numel()
    large = rows >= MIN_ROWS and values >= MIN_WEIGHT_VALUES and rows * values >= MIN_MULTIPLY_ADDS
    return large and not torch.is_autocast_enabled("cpu") and onednn_selected()


def _onednn_linear(x_X_K: Tensor, weight_N_K: Tensor, bias_N: Tensor | None = None) -> Tensor:
    """x @ weight.T + bias by oneDNN, its rows padded with zeros (`padded_rows`)."""
    rows = x_X_K.numel() // x_X_K.shape[-1]
    x_R_K = padded_rows(x_X_K.reshape(rows, x_X_K.shape[-1]))
    y_R_N = onednn_product(x_R_K, weight_N_K, bias_N)
    return y_R_N[:rows].view(*x_X_K.shape[:-1], weight_N_K.shape[0])


def onednn_product(a_M_K: Tensor, b_N_K: Tensor, bias_N: Tensor | None = None) -> Tensor:
    """a @ b.T + bias, oneDNN's float32 inner product (the op PyTorch's mkldnn fusions call). [M, N]"""
    return torch.ops.mkldnn._linear_pointwise(a_M_K, b_N_K, bias_N, "none", [], "")


def padded_count(rows: int) -> int:
    """`rows` rounded up to a multiple of its row bucket, the power of two in [rows / 32, rows / 16) (at least
    MIN_ROW_BUCKET): how many rows oneDNN computes for that many."""
    bucket = max(MIN_ROW_BUCKET, 1 << max(rows.bit_length() - 5, 0))
    return -(-rows // bucket) * bucket


def padded_rows(x_M_K: Tensor) -> Tensor:
    """x with zero rows appended up to `padded_count` rows (x itself when it has that many). [R, K]"""
    rows, padded = x_M_K.shape[0], padded_count(x_M_K.shape[0])
    if padded == rows:
        return x_M_K
    x_R_K = x_M_K.new_empty(padded, x_M_K.shape[1])
    x_R_K[:rows] = x_M_K
    x_R_K[rows:] = 0
    return x_R_K


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b; backward dx = dy W, dW = dy^T x, db = sum over rows of dy, each product by oneDNN."""

    @staticmethod
    def forward(ctx: Any, x_X_K: Tensor, weight_N_K: Tensor, bias_N: Tensor | None) -> Tensor:
        ctx.save_for_backward(x_X_K, weight_N_K)
        ctx.has_bias = bias_N is not None
        return _onednn_linear(x_X_K, weight_N_K, bias_N)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_X_N: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # type: ignore[override]
        x_X_K, weight_N_K = ctx.saved_tensors
        grad_M_N = grad_X_N.reshape(-1, grad_X_N.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_linear(grad_X_N, weight_N_K.t())
        if ctx.needs_input_grad[1]:
            # the rows are the product's inner dimension here: zero rows on both sides add nothing. With both
            # operands transposed, oneDNN is faster with the one of fewer rows first (RESULTS.md, "Kernels")
            x_R_K, grad_R_N = padded_rows(x_X_K.reshape(-1, x_X_K.shape[-1])), padded_rows(grad_M_N)
            if grad_R_N.shape[1] <= x_R_K.shape[1]:
                grad_weight = onednn_product(grad_R_N.t(), x_R_K.t())
            else:
                grad_weight = onednn_product(x_R_K.t(), grad_R_N.t()).t().contiguous()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_M_N.sum(dim=0)
        return grad_x, grad_weight, grad_bias


@functools.cache
def onednn_selected() -> bool:
    """Whether float32 CPU linear layers go through oneDNN in this process: as POSTTRAIN_CPU_MATMUL says,
    or, when it is `auto` or unset, when oneDNN computes the same product and is clearly faster here."""
    choice = kernel_choice()
    if choice == "blas":
        return False
    available = onednn_available()
    if choice == "onednn" and not available:
        raise KernelChoiceError(f"{ENV_VAR}=onednn, but this PyTorch build has no oneDNN linear kernel")
    if available:
        bound_kernel_caches()
    return available and (choice == "onednn" or _onednn_is_faster())


def kernel_choice() -> str:
    """POSTTRAIN_CPU_MATMUL's value (`auto` when unset). Raises KernelChoiceError naming the variable and the
    allowed values for any other; every run calls it first (`trainers.lifecycle.Lifecycle`, evaluation)."""
    choice = os.environ.get(ENV_VAR, "auto")
    if choice not in CHOICES:
        raise KernelChoiceError(f"{ENV_VAR}={choice!r} is not one of {', '.join(CHOICES)}")
    return choice


@functools.cache
def bound_kernel_caches() -> None:
    """Caps oneDNN's kernel caches at KERNEL_CACHE_ENTRIES each where the environment does not set them. Both
    libraries read these variables when they first build a kernel, so this only takes effect before that: every
    run calls it first (`trainers.build.check_environment`), and so do the compact forwards (`linear_of`); once
    per process, as the libraries read the variables once. bfloat16 CPU runs, whose products PyTorch sends to
    oneDNN, are capped too (their peak memory against speed: RESULTS.md, "Kernels")."""
    for name in KERNEL_CACHE_VARIABLES:
        os.environ.setdefault(name, str(KERNEL_CACHE_ENTRIES))


def onednn_available() -> bool:
    """Whether this PyTorch build has the oneDNN float32 inner product `onednn_product` calls."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_is_faster() -> bool:
    """Times both kernels on a training-sized product ([512, 512] x [512, 1024], best of 5 each) after
    checking that they agree."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 512, generator=generator)
    weight = torch.randn(1024, 512, generator=generator)
    try:
        same = torch.allclose(_onednn_linear(x, weight), F.linear(x, weight), rtol=1e-4, atol=1e-3)
    except RuntimeError:  # a build whose oneDNN op refuses plain float32 tensors
        return False
    return same and _best_time(_onednn_linear, x, weight) <= _best_time(F.linear, x, weight) / REQUIRED_SPEEDUP


def _best_time(fn: Any, x: Tensor, weight: Tensor, repeats: int = 5) -> float:
    fn(x, weight)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn(x, weight)
        best = min(best, time.perf_counter() - started)
    return best
