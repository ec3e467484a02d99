"""The specialised kernels of the shared layer forward (`policies/decoder_layer.py`): autograd functions that keep
fewer activations than autograd's own ops, and the attention kernels of training, prefill and decoding.

Each exists because bench/ shows it pays (bench/RESULTS.md, "Kernels"); each is held equal to the plain ops in
tests/policies/test_kernels.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

HALF_DTYPES = (torch.bfloat16, torch.float16)

SHORT_ROW = 64
SHORT_ATTENTION_SCORES = 1 << 22
"""`causal_attention` computes rows of at most SHORT_ROW positions by batched products on CPU, when their
[S * N, T, T] scores (kept for the backward) hold at most this many values (16 MB per layer)."""

SOFTMAX_MIN_WIDTH = 16
"""PyTorch's CPU softmax is several times slower over rows shorter than its 16-float vectors (bench/RESULTS.md,
"Kernels"): `causal_attention` gives its short rows' softmax at least this many keys."""


class RMSNorm(torch.autograd.Function):
    """y = w * x * r with r = (mean(x^2) + eps)^-1/2 over the last axis (Zhang & Sennrich 2019, arXiv:1910.07467),
    in float32, with a backward of five passes over x:

        dx = r * (g w - x_hat * mean(g w x_hat)),   dw = sum over rows of g x_hat,   x_hat = x r

    PyTorch's CPU `rms_norm` is a composite whose backward replays its forward's ops, one allocation each
    (bench/rms_norm.py). It keeps x_hat and r for the backward, where the composite keeps x and more."""

    @staticmethod
    def forward(ctx: Any, x_X_H: Tensor, weight_H: Tensor, eps: float) -> Tensor:
        inv_rms_X_1 = torch.linalg.vecdot(x_X_H, x_X_H).div_(x_X_H.shape[-1]).add_(eps).rsqrt_().unsqueeze_(-1)
        normed_X_H = x_X_H * inv_rms_X_1
        ctx.save_for_backward(normed_X_H, weight_H, inv_rms_X_1)
        return normed_X_H * weight_H

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_X_H: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        normed_X_H, weight_H, inv_rms_X_1 = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_normed_X_H = grad_X_H * weight_H
            mean_X_1 = torch.linalg.vecdot(grad_normed_X_H, normed_X_H).div_(-normed_X_H.shape[-1]).unsqueeze_(-1)
            grad_x = grad_normed_X_H.addcmul_(normed_X_H, mean_X_1).mul_(inv_rms_X_1)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_X_H * normed_X_H).reshape(-1, weight_H.shape[0]).sum(0)
        return grad_x, grad_weight, None


class HalfRMSNorm(torch.autograd.Function):
    """Llama's RMSNorm of bfloat16 or float16 x, as its module computes it (in float32, rounded to x's dtype before
    the weight):

        y = w * round(x_hat),   x_hat = x r,   r = (mean(x^2) + eps)^-1/2,   both in float32
        dx = round(r * (g' - x_hat * mean(g' x_hat))),   g' = float32(g w),   dw = sum over rows of g round(x_hat)

    It keeps x in its own dtype and r for the backward, which recomputes x_hat; the module's ops keep a float32 copy
    of x and the rounded x_hat, three times the bytes (bench/activation_memory.py)."""

    @staticmethod
    def forward(ctx: Any, x_X_H: Tensor, weight_H: Tensor, eps: float) -> Tensor:
        x32_X_H = x_X_H.float()
        inv_rms_X_1 = torch.rsqrt(x32_X_H.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x_X_H, weight_H, inv_rms_X_1)
        return weight_H * (x32_X_H * inv_rms_X_1).to(x_X_H.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_X_H: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x_X_H, weight_H, inv_rms_X_1 = ctx.saved_tensors
        normed_X_H = x_X_H.float() * inv_rms_X_1
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_normed_X_H = (grad_X_H * weight_H).float()
            mean_X_1 = (grad_normed_X_H * normed_X_H).mean(-1, keepdim=True)
            grad_x = ((grad_normed_X_H - normed_X_H * mean_X_1) * inv_rms_X_1).to(x_X_H.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_X_H * normed_X_H.to(x_X_H.dtype)).reshape(-1, weight_H.shape[0]).sum(0)
        return grad_x, grad_weight, None


class SwiGLUDown(torch.autograd.Function):
    """out = down(silu(g) * u), the SwiGLU MLP after its gate and up products (Shazeer 2020, arXiv:2002.05202),
    keeping g and u only for the backward, which recomputes y = silu(g) * u by the same ops:

        dW = dout^T y,   db = sum over rows of dout,   dy = dout W,   du = dy * silu(g),   dg = silu'(g) * (dy * u)

    Autograd's own ops keep four [X, I] tensors (g, silu(g), u and y); here two (bench/activation_memory.py). The
    gradients are autograd's to the bit (down's weight as `mm_mat2_backward` takes it, the activation's by
    `silu_backward`).

    `linear` is down's product as the forward would run it (`decoder_layer.linear_op`), `weight` and `bias` its
    parameters. Inputs of any leading axes [..., I]; returns [..., H]."""

    @staticmethod
    def forward(ctx: Any, gate_X_I: Tensor, up_X_I: Tensor, linear: Callable[[Tensor], Tensor], weight_H_I: Tensor,
                bias_H: Tensor | None) -> Tensor:  # fmt: skip
        ctx.save_for_backward(gate_X_I, up_X_I, weight_H_I)
        ctx.has_bias = bias_H is not None
        return linear(F.silu(gate_X_I) * up_X_I)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_X_H: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        gate_X_I, up_X_I, weight_H_I = ctx.saved_tensors
        need_gate, need_up, _, need_weight, need_bias = ctx.needs_input_grad
        silu_X_I = F.silu(gate_X_I)
        grad_rows_H = grad_X_H.flatten(0, -2)
        grad_weight = grad_rows_H.T.mm((silu_X_I * up_X_I).flatten(0, -2)) if need_weight else None
        grad_bias = grad_rows_H.sum(0) if need_bias and ctx.has_bias else None
        grad_y_X_I = grad_X_H.matmul(weight_H_I) if need_gate or need_up else None
        grad_up = grad_y_X_I * silu_X_I if need_up else None
        grad_gate = torch.ops.aten.silu_backward(grad_y_X_I * up_X_I, gate_X_I) if need_gate else None
        return grad_gate, grad_up, None, grad_weight, grad_bias


# ---------------------------------------------------------------- attention


def soft_cap(x: Tensor, cap: float | None) -> Tensor:
    """cap * tanh(x / cap), Gemma 2's soft-capping of attention scores and final logits (Gemma Team 2024,
    arXiv:2408.00118), in transformers' order of ops; x itself when cap is None. In place where no gradient is
    needed."""
    if cap is None:
        return x
    if torch.is_grad_enabled() and x.requires_grad:
        return torch.tanh(x / cap) * cap
    return x.div_(cap).tanh_().mul_(cap)


def grouped_attention(
    q_B_N_T_D: Tensor, k_B_G_L_D: Tensor, v_B_G_L_D: Tensor, bias: Tensor, scale: float, softcap: float | None = None
) -> Tensor:
    """softmax(soft_cap(q k^T * scale) + bias) v, N query heads sharing G key/value heads (query head n reads head
    n // (N / G), as `enable_gqa`), by two batched products: each key/value head's N / G query heads are stacked
    along the positions, so keys and values are not repeated. [B, N, T, D].

    bias: additive (0 or -inf), broadcastable to [B * G, (N / G) * T, L]: [B * G, 1, L] for one query per row (a
    decode step), [(N / G) * T, L] for a mask shared by every row (`causal_bias` repeated), or `grouped_bias`.
    The softmax is in float32 for half-precision inputs, as transformers' eager attention computes it."""
    rows, heads, width, dim = q_B_N_T_D.shape
    groups, keys = k_B_G_L_D.shape[1], k_B_G_L_D.shape[2]
    q_BG_RT_D = q_B_N_T_D.reshape(rows * groups, heads // groups * width, dim)
    k_BG_D_L = k_B_G_L_D.reshape(rows * groups, keys, dim).transpose(1, 2)
    if softcap is None:
        scores_BG_RT_L = torch.baddbmm(bias, q_BG_RT_D, k_BG_D_L, alpha=scale)
    else:
        # cap tanh(s scale / cap) + bias in three ops on the product's own buffer (autograd keeps tanh's output)
        tanh_BG_RT_L = torch.bmm(q_BG_RT_D, k_BG_D_L).mul_(scale / softcap).tanh_()
        scores_BG_RT_L = torch.add(bias, tanh_BG_RT_L, alpha=softcap)
    if scores_BG_RT_L.dtype in HALF_DTYPES:
        weights_BG_RT_L = scores_BG_RT_L.softmax(dim=-1, dtype=torch.float32).to(v_B_G_L_D.dtype)
    else:
        weights_BG_RT_L = scores_BG_RT_L.softmax(dim=-1)
    o_BG_RT_D = torch.bmm(weights_BG_RT_L, v_B_G_L_D.reshape(rows * groups, keys, dim))
    return o_BG_RT_D.view(rows, heads, width, dim)


def causal_bias(width: int, keys: int, window: int | None, like: Tensor) -> Tensor:
    """Additive mask [T, L] of causal attention over T positions, each query i seeing keys j <= i and, with a
    sliding window, j > i - window (transformers' `sliding_window_overlay`); keys j >= T (padding) are hidden."""
    i_T_1 = torch.arange(width, device=like.device)[:, None]
    j_1_L = torch.arange(keys, device=like.device)[None]
    hidden_T_L = (j_1_L > i_T_1) if window is None else (j_1_L > i_T_1) | (j_1_L <= i_T_1 - window)
    return torch.zeros(width, keys, dtype=like.dtype, device=like.device).masked_fill_(hidden_T_L, float("-inf"))


def grouped_bias(bias_B_1_T_L: Tensor, groups: int, per_group: int) -> Tensor:
    """A per-row mask [B, 1, T, L] laid out for `grouped_attention`: [B * G, (N / G) * T, L]."""
    rows, _, width, keys = bias_B_1_T_L.shape
    return bias_B_1_T_L[:, :, None].expand(rows, groups, per_group, width, keys).reshape(rows * groups, -1, keys)


def causal_attention(
    q_S_N_T_D: Tensor, k_S_K_T_D: Tensor, v_S_K_T_D: Tensor, scale: float, softcap: float | None = None,
    window: int | None = None,
) -> Tensor:  # fmt: skip
    """softmax(soft_cap(q k^T * scale) + causal mask) v over S independent rows of T positions (a sliding window of
    `window` keys if given), N query heads sharing K key/value heads. [S, N, T, D].

    On CPU in float32 (no autocast) with short rows, and wherever scores are soft-capped, by `grouped_attention`
    with the mask as a bias; short rows' keys padded with zeros (masked out) to SOFTMAX_MIN_WIDTH. Elsewhere
    PyTorch's fused kernel, 1.3-2.5x slower on the short rows (bench/RESULTS.md, "Kernels")."""
    rows, q_heads, width = q_S_N_T_D.shape[:3]
    kv_heads = k_S_K_T_D.shape[1]
    short = width <= SHORT_ROW and rows * q_heads * width * width <= SHORT_ATTENTION_SCORES
    float32 = q_S_N_T_D.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    fast = short and q_S_N_T_D.device.type == "cpu" and float32
    if not fast and softcap is None:
        band = None if window is None else causal_bias(width, width, window, q_S_N_T_D) == 0
        return F.scaled_dot_product_attention(
            q_S_N_T_D, k_S_K_T_D, v_S_K_T_D, attn_mask=band, is_causal=band is None, scale=scale,
            enable_gqa=q_heads != kv_heads,
        )  # fmt: skip
    keys = max(width, SOFTMAX_MIN_WIDTH) if fast else width
    k_S_K_L_D, v_S_K_L_D = k_S_K_T_D, v_S_K_T_D
    if keys > width:
        k_S_K_L_D, v_S_K_L_D = (F.pad(x, (0, 0, 0, keys - width)) for x in (k_S_K_T_D, v_S_K_T_D))
    bias_RT_L = causal_bias(width, keys, window, q_S_N_T_D).repeat(q_heads // kv_heads, 1)
    return grouped_attention(q_S_N_T_D, k_S_K_L_D, v_S_K_L_D, bias_RT_L, scale, softcap)
