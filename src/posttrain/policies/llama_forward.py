"""Compact forwards of Llama-family decoders (Llama, Qwen2 with full attention) from the model's own modules.

Two users: the training forward here (`unpadded_hidden_states`), which runs the decoder on the real
tokens of a padded or packed batch only, and the native engine's static-cache decoder
(`posttrain.rollout.decoders`). Both read the model's modules (embeddings, norms, rotary tables,
activation, Linear layers plain or LoRA-wrapped), looked up once per forward or generation (`LayerOps`), so
they follow the weights as they train.

The unpadded forward (issue #7: no compute on padding). Embeddings, norms, projections and the MLP run
on the N real tokens as one [N, H] matrix. For attention each document (a row, or one of the documents
packed in a row) is scattered left-aligned into its own row of a [S, heads, Tmax, D] layout, so a causal
SDPA needs no mask: the padding after a document's tokens is later than all of them. Rotary tables come
from the model's `rotary_emb` at the positions the model's own forward would use, so every RoPE scaling
variant it implements is reproduced. tests/policies/test_unpadded_forward.py holds log-probs, entropies
and gradients equal to the model's forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain.policies import cpu_matmul

RMS_NORMS = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm"})
SILUS = frozenset({"SiLUActivation", "SiLU"})
LLAMA_FAMILIES = frozenset({"llama", "qwen2"})
"""`config.model_type`s whose decoder layer is: x += o(attn(rope(q(n1(x))), rope(k(..)), v(..)));
x += down(act(gate(n2(x))) * up(n2(x))), with RMSNorm, rotate-half RoPE and grouped-query attention."""
ATTENTION_KERNELS = frozenset({"eager", "sdpa"})
"""`config._attn_implementation`s whose results a causal SDPA reproduces (flash and flex kernels differ in
their numerics and features, and a custom registered kernel may do anything)."""


MIN_SHARED_FRACTION = 0.1
"""Repeated tokens are computed once only when they are at least this share of the real tokens: copying keys
and values into every document costs a few percent of a forward + backward (measured on CPU: sharing 1.5% of
an SFT batch's tokens made it 2.7% slower; a GRPO group's 16% shared prompt made it 6-10% faster)."""

SHORT_ROW = 64
SHORT_ATTENTION_SCORES = 1 << 22
"""`causal_attention` computes rows of at most SHORT_ROW positions by batched products on CPU, when their
[S * N, T, T] scores (kept for the backward) hold at most this many values (16 MB per layer)."""

SOFTMAX_MIN_WIDTH = 16
"""PyTorch's CPU softmax is several times slower over rows shorter than its 16-float vectors than over 16-wide
ones: measured on 2 Xeon cores, torch 2.13, [128, 20, 10] 235 us against 36 us for [128, 20, 16] (forward and
backward 335 us against 72 us). `causal_attention` gives its short rows' softmax at least this many keys."""


def has_llama_layers(model: Any) -> bool:
    """Whether the model is a Llama-family decoder with full attention that the compact forwards reproduce."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in LLAMA_FAMILIES:
        return False
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return False  # sliding-window layers
    if getattr(config, "use_sliding_window", False):
        return False
    try:
        decoder = decoder_of(model)
        layer = decoder.layers[0]
        _ = (decoder.embed_tokens, decoder.norm, decoder.rotary_emb, layer.self_attn.scaling, layer.mlp.act_fn)
    except AttributeError:
        return False
    return True


def runs_unpadded(model: Any) -> bool:
    """Whether `unpadded_hidden_states` reproduces the model's training forward: a Llama-family decoder,
    eager or SDPA attention, no attention dropout while training, no activation checkpointing (it would
    be skipped) and no forward hooks on any module (the compact forward calls plain Linear layers and
    the decoder layers' maths directly, so hooks such as FSDP's parameter gathering would not run)."""
    if not has_llama_layers(model):
        return False
    config = model.config
    if getattr(config, "_attn_implementation", "eager") not in ATTENTION_KERNELS:
        return False
    if model.training and getattr(config, "attention_dropout", 0.0):
        return False
    # transformers sets the flag as an instance attribute; vars() skips Module.__getattr__, which raises and
    # catches an AttributeError for every module without it (3x the scan's time, on every forward)
    return not any(vars(m).get("gradient_checkpointing", False) for m in model.modules()) and not has_hooks(model)


def has_hooks(model: Any) -> bool:
    """Whether a module of the model has forward hooks (FSDP's parameter gathering, a user's probe). The compact
    forwards call the layers' Linear maths directly, so such hooks would not run."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def base_model(model: Any) -> Any:
    """The transformers model under a peft wrapper (LoRA layers stay in place and are called as modules)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_of(model: Any) -> Any:
    """The decoder stack (embeddings, layers, final norm) of a causal LM, under any peft wrapper, or the
    model itself when it is one already (a bare `LlamaModel`, as the PPO critic's backbone)."""
    body = base_model(model)
    # recent transformers' generic `get_decoder` returns a bare decoder itself; older ones define it on LMs only
    get_decoder = getattr(body, "get_decoder", None)
    return body if get_decoder is None else get_decoder()


def linear_op(module: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    """A Linear layer as a function of x: a plain Linear as `cpu_matmul.linear_of` its weight and bias (the faster
    CPU kernel, no module dispatch), anything else (LoRA) as the module itself, so its own forward runs."""
    if type(module) is torch.nn.Linear:
        return cpu_matmul.linear_of(module.weight, module.bias)
    return module


def norm_op(module: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    """Llama's and Qwen2's RMSNorm: where a gradient is needed `RMSNorm` on float32 input, `HalfRMSNorm` on
    bfloat16 or float16 input; else PyTorch's `rms_norm` on float32 and the module on other dtypes. Other norms run
    the module."""
    if type(module).__name__ not in RMS_NORMS:
        return module
    shape, weight, eps = module.weight.shape, module.weight, module.variance_epsilon

    def norm(x: Tensor) -> Tensor:
        grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        if x.dtype == torch.float32:
            return RMSNorm.apply(x, weight, eps) if grad else F.rms_norm(x, shape, weight, eps)
        if grad and x.dtype in HALF_DTYPES:
            return HalfRMSNorm.apply(x, weight, eps)
        return module(x)

    return norm


class RMSNorm(torch.autograd.Function):
    """y = w * x * r with r = (mean(x^2) + eps)^-1/2 over the last axis (Zhang & Sennrich 2019,
    arXiv:1910.07467), as Llama's and Qwen2's RMSNorm in float32, with a backward of five passes over x:

        dx = r * (g w - x_hat * mean(g w x_hat)),   dw = sum over rows of g x_hat,   x_hat = x r

    PyTorch's `rms_norm` is a composite on CPU whose backward runs its forward's ops backwards, one
    allocation each. Alone, forward and backward of [3000, 512] took 3.9 ms here against 11.7 ms (2 Xeon cores,
    torch 2.13); within a whole forward and backward the gain is smaller (`python bench/rms_norm.py`: 5% of a
    demo GRPO batch's, within 2% either way on SFT and DPO batches and on the 30m model). It keeps x_hat and r
    for the backward, where the composite keeps x and more."""

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


HALF_DTYPES = (torch.bfloat16, torch.float16)


class HalfRMSNorm(torch.autograd.Function):
    """Llama's and Qwen2's RMSNorm of bfloat16 or float16 x, as their modules compute it (in float32, rounded to x's
    dtype before the weight):

        y = w * round(x_hat),   x_hat = x r,   r = (mean(x^2) + eps)^-1/2,   both in float32
        dx = round(r * (g' - x_hat * mean(g' x_hat))),   g' = float32(g w),   dw = sum over rows of g round(x_hat)

    It keeps x in its own dtype and r for the backward, which recomputes x_hat. The module's ops keep a float32
    copy of x and the rounded x_hat: three times the bytes, a tenth of a Qwen2-0.5B layer's activations in bfloat16
    training. Held to the module's gradients in tests/policies/test_llama_forward.py."""

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


def activation_op(module: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    """The MLP's activation: SiLU (Llama's and Qwen2's) as F.silu, any other as the module."""
    return F.silu if type(module).__name__ in SILUS else module


SWIGLU_MIN_VALUES = 1 << 20
"""`SwiGLUDown` keeps two [X, I] tensors fewer than autograd's ops, which pays where they are large. Below this many
values (4 MB in float32) the saving is small and the function's overhead shows: measured on 2 Xeon cores, torch
2.13, forward + backward of the demo model's SFT, DPO and GRPO batches ([X, I] of 0.2-0.8M values) 1.5-3.5% slower
through it; the 30m model's, within 1% either way."""


def gated_down_op(act_fn: torch.nn.Module, down_proj: torch.nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """The MLP after its gate and up products, down(act(gate) * up), as a function of gate and up: through
    `SwiGLUDown` where a gradient is needed, the activation is SiLU, `down_proj` a plain Linear, autocast (if on)
    leaves the product's dtypes as they are and gate holds at least SWIGLU_MIN_VALUES values; else through the ops
    themselves."""
    act, down = activation_op(act_fn), linear_op(down_proj)
    if act is not F.silu or type(down_proj) is not torch.nn.Linear:
        return lambda gate, up: down(act(gate) * up)
    weight, bias = down_proj.weight, down_proj.bias

    def gated_down(gate: Tensor, up: Tensor) -> Tensor:
        grad = torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad or weight.requires_grad)
        if grad and gate.numel() >= SWIGLU_MIN_VALUES and not _autocast_casts(gate, weight):
            return SwiGLUDown.apply(gate, up, down, weight, bias)
        return down(F.silu(gate) * up)

    return gated_down


def _autocast_casts(x: Tensor, weight: Tensor) -> bool:
    """Whether autocast, if on for x's device, would cast x or weight for their product."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return False
    return not x.dtype == weight.dtype == torch.get_autocast_dtype(device)


class SwiGLUDown(torch.autograd.Function):
    """out = down(silu(g) * u), Llama's and Qwen2's SwiGLU MLP after its gate and up products (Shazeer 2020,
    arXiv:2002.05202), keeping g and u only for the backward, which recomputes y = silu(g) * u by the same ops:

        dW = dout^T y,   db = sum over rows of dout,   dy = dout W,   du = dy * silu(g),   dg = silu'(g) * (dy * u)

    Autograd's own ops keep four [X, I] tensors, g (for silu), silu(g) and u (for the product) and y (for down's
    weight), half of a Qwen2-0.5B layer's activations in training (1.43 MiB a token over its 24 layers, in
    bfloat16); here two. The gradients are autograd's to the bit (down's weight as `mm_mat2_backward` takes it, the
    activation's by `silu_backward`): tests/policies/test_llama_forward.py. The recompute costs two elementwise
    passes over [X, I] in the backward.

    `linear` is down's product as the forward would run it (`linear_op`), `weight` and `bias` its parameters.
    Inputs of any leading axes [..., I]; returns [..., H]."""

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


@dataclass(frozen=True)
class LayerOps:
    """One decoder layer's maths as functions of tensors, its modules looked up once (`layer_ops`) rather than at
    every layer of every step: on CPU the module attribute look-ups and per-call kernel checks cost about 30 us a
    layer, a fifth of the demo model's decode step (measured on 2 Xeon cores, batch 64: 2.3 ms against 1.8 ms).
    The functions hold the model's own parameters and modules, so they compute with the weights as they are when
    called; the forwards resolve them again at each call (training) or generation (decoding)."""

    input_norm: Callable[[Tensor], Tensor]
    q_proj: Callable[[Tensor], Tensor]
    k_proj: Callable[[Tensor], Tensor]
    v_proj: Callable[[Tensor], Tensor]
    o_proj: Callable[[Tensor], Tensor]
    post_norm: Callable[[Tensor], Tensor]
    gate_proj: Callable[[Tensor], Tensor]
    up_proj: Callable[[Tensor], Tensor]
    gated_down: Callable[[Tensor, Tensor], Tensor]
    scaling: float

    def mlp_residual(self, x_X_H: Tensor) -> Tensor:
        """The layer's second half, x + down(act(gate(n2(x))) * up(n2(x))), over any leading axes."""
        h_X_H = self.post_norm(x_X_H)
        return x_X_H + self.gated_down(self.gate_proj(h_X_H), self.up_proj(h_X_H))


def layer_ops(layer: torch.nn.Module) -> LayerOps:
    """A Llama-family decoder layer's `LayerOps`."""
    attn, mlp = layer.self_attn, layer.mlp
    q_proj, k_proj, v_proj, o_proj = (linear_op(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
    return LayerOps(
        norm_op(layer.input_layernorm), q_proj, k_proj, v_proj, o_proj, norm_op(layer.post_attention_layernorm),
        linear_op(mlp.gate_proj), linear_op(mlp.up_proj), gated_down_op(mlp.act_fn, mlp.down_proj), attn.scaling,
    )  # fmt: skip


def rotate(x_A_H_S_D: Tensor, cos_A_1_S_D: Tensor, signed_sin_A_1_S_D: Tensor) -> Tensor:
    """Rotate-half RoPE, as transformers' `apply_rotary_pos_emb` for Llama and Qwen2 (any leading axes that
    broadcast: [A, heads, S, D] with [A, 1, S, D], or [N, heads, D] with [N, 1, D]):

        x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x2, x1) = roll(x, D/2) * [-1 .. -1, 1 .. 1]

    taken as x * cos + roll(x, D/2) * signed_sin, `signed_sin = signed_half(sin)` made once per forward: the
    same roundings in every dtype (negation is exact), one roll where the slices, negation and cat took four
    ops (measured on 2 Xeon cores: 11 us against 15 us for a decode step's [64, 4, 1, 32]; forward and
    backward of [2400, 4, 32], 0.51 ms against 1.01 ms)."""
    rolled = x_A_H_S_D.roll(x_A_H_S_D.shape[-1] // 2, dims=-1)
    return x_A_H_S_D * cos_A_1_S_D + rolled * signed_sin_A_1_S_D


def signed_half(sin_X_D: Tensor) -> Tensor:
    """sin with its first half negated, for `rotate`. [..., D] -> [..., D]"""
    half = sin_X_D.shape[-1] // 2
    return torch.cat((-sin_X_D[..., :half], sin_X_D[..., half:]), dim=-1)


@dataclass(frozen=True)
class Documents:
    """Where the real tokens of a [B, T] batch sit, in the batch and in the attention layout [S, Tmax].

    Rows that repeat the previous row's first tokens (a GRPO group's shared prompt, a preference pair's
    prompt) repeat its hidden states there too: those tokens are computed once, in the first row that has
    them (the U computed tokens), and their keys and values are copied into every document that holds them.

    token_U: flat index b * T + t of each computed token, in row-major order. [U]
    slot_U: flat index s * Tmax + i of its slot (document s, i-th token of that document): its query's. [U]
    kv_slot_N: the slot of every one of the N real tokens, where its key and value go. [N]
    kv_source_N: index into U of the computed token whose key and value each real token holds; None when
        nothing is repeated (U = N, the identity). [N]
    index_BT: index into U of the computed token holding each real position's hidden state. [B * T]
    num_docs: S. max_len: Tmax, the longest document.
    """

    token_U: Tensor
    slot_U: Tensor
    kv_slot_N: Tensor
    kv_source_N: Tensor | None
    index_BT: Tensor
    num_docs: int
    max_len: int


def find_documents(
    input_ids_B_T: Tensor, real_B_T: Tensor, position_ids_B_T: Tensor | None, *, share_prefixes: bool = True
) -> Documents | None:
    """The documents of a batch whose real tokens (`real_B_T`, bool) are a prefix of each row.

    Without position ids each row is one document. With them a row splits wherever its position ids do
    not step by +1, as transformers splits packed rows (`masking_utils.find_packed_sequence_indices`).
    With `share_prefixes`, tokens that repeat the previous row's (`repeats_previous_row`) are not computed
    again, when they are at least `MIN_SHARED_FRACTION` of the real tokens. None when the batch holds no
    real token.
    """
    batch, width = real_B_T.shape
    real_BT = real_B_T.flatten()
    token_N = real_BT.nonzero().squeeze(1)
    if token_N.numel() == 0:
        return None
    positions_B_T = None if position_ids_B_T is None else position_ids_B_T.expand(real_B_T.shape)
    starts_B_T = torch.zeros_like(real_B_T)
    starts_B_T[:, 0] = True
    if positions_B_T is not None:
        starts_B_T[:, 1:] = positions_B_T.diff(dim=1) != 1
    start_N = starts_B_T.flatten()[token_N]
    doc_N = start_N.cumsum(0) - 1
    first_S = start_N.nonzero().squeeze(1)  # index into N of each document's first token
    offset_N = torch.arange(len(token_N), device=token_N.device) - first_S[doc_N]
    max_len = int(offset_N.max()) + 1
    slot_N = doc_N * max_len + offset_N
    repeats_B_T = repeats_previous_row(input_ids_B_T, real_B_T, positions_B_T) if share_prefixes else None
    if repeats_B_T is None or int(repeats_B_T.sum()) < MIN_SHARED_FRACTION * len(token_N):
        return Documents(token_N, slot_N, slot_N, None, real_BT.cumsum(0) - 1, len(first_S), max_len)
    # each repeated token's state is that of the same column in the last row above it that computes it
    rows_B_T = torch.arange(batch, device=real_B_T.device)[:, None].expand(batch, width)
    source_row_B_T = torch.where(repeats_B_T, 0, rows_B_T).cummax(dim=0).values
    source_BT = (source_row_B_T * width + torch.arange(width, device=real_B_T.device)).flatten()
    computed_BT = real_BT & ~repeats_B_T.flatten()
    index_BT = (computed_BT.cumsum(0) - 1)[source_BT]
    token_U = computed_BT.nonzero().squeeze(1)
    return Documents(token_U, slot_N[computed_BT[token_N]], slot_N, index_BT[token_N], index_BT, len(first_S), max_len)


def repeats_previous_row(input_ids_B_T: Tensor, real_B_T: Tensor, positions_B_T: Tensor | None) -> Tensor:
    """[B, T] bool: True at (b, t) when rows b and b - 1 hold the same real tokens at the same positions at
    every column up to t. Under causal attention a token's hidden state depends on those only, so it is
    the same in both rows (Prefix Grouper, Liu et al. 2025, arXiv:2506.05433, shares a GRPO group's prompt
    so). Row 0 repeats nothing."""
    same_B_T = torch.zeros_like(real_B_T)
    same_B_T[1:] = (input_ids_B_T[1:] == input_ids_B_T[:-1]) & real_B_T[1:] & real_B_T[:-1]
    if positions_B_T is not None:
        same_B_T[1:] &= positions_B_T[1:] == positions_B_T[:-1]
    return same_B_T.cummin(dim=1).values


def unpadded_hidden_states(
    model: Any, input_ids_B_T: Tensor, position_ids_B_T: Tensor | None, docs: Documents, at_M: Tensor | None = None
) -> Tensor:
    """Final hidden states (after the last norm) of the computed tokens, each attending causally to its own
    document only; equal to the model's forward at those tokens. [M, H] for the M rows `at_M` (indices
    into `docs.token_U`, each at most once), or [U, H] for all computed tokens when `at_M` is None.

    `model`: a causal LM or a bare decoder (`decoder_of`).
    `position_ids_B_T`: the positions given to the model's forward (None: 0, 1, ... in every row); they
    select the rotary angles, as in the model's forward. Check `runs_unpadded(model)` first.

    Where the linear layers run on oneDNN, which computes a product over rows padded to a bucket
    (`cpu_matmul.padded_count`), the rows are padded once here instead of at each product: the padding
    rows after the real ones run through the norms, projections and MLP, but never attention, and are
    dropped at the end, so they reach no real token and their gradients are zero.
    """
    body = decoder_of(model)
    config = body.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    width = input_ids_B_T.shape[1]
    x_U_H = body.embed_tokens(input_ids_B_T.flatten()[docs.token_U])
    positions = torch.arange(width, device=input_ids_B_T.device)[None] if position_ids_B_T is None else position_ids_B_T
    # the model's own rotary module on the positions its forward would see (dynamic scaling reads their max)
    cos_P_T_D, sin_P_T_D = body.rotary_emb(x_U_H, positions)
    # one row of angles shared by every batch row, or one per row: index it without expanding to [B * T, D]
    at_U = docs.token_U % width if cos_P_T_D.shape[0] == 1 else docs.token_U
    cos_U_1_D = cos_P_T_D.flatten(0, 1)[at_U, None]
    sin_U_1_D = signed_half(sin_P_T_D).flatten(0, 1)[at_U, None]
    layers = body.layers[: config.num_hidden_layers]
    pad = products_pad_rows(layers[0].self_attn.q_proj, x_U_H)
    x_R_H = cpu_matmul.padded_rows(x_U_H) if pad else x_U_H
    computed = queries = len(docs.token_U)
    slot_R = padded_index(docs.slot_U, len(x_R_H))  # the real rows' slots, then padding
    for index, ops in enumerate(layer_ops(layer) for layer in layers):
        h_R_H = ops.input_norm(x_R_H)
        k_U_K_D = rotate(ops.k_proj(h_R_H)[:computed].unflatten(1, (kv_heads, -1)), cos_U_1_D, sin_U_1_D)
        v_U_K_D = ops.v_proj(h_R_H)[:computed].unflatten(1, (kv_heads, -1))
        cos_Q_1_D, sin_Q_1_D = cos_U_1_D, sin_U_1_D
        if at_M is not None and index == len(layers) - 1:
            # every layer's keys and values are needed at all tokens, but the last layer's queries, output
            # projection and MLP only where the caller reads (completion tokens: a third of an arithmetic row)
            rows_R = padded_index(at_M, cpu_matmul.padded_count(len(at_M)) if pad else len(at_M))
            x_R_H, h_R_H, slot_R = x_R_H.index_select(0, rows_R), h_R_H.index_select(0, rows_R), docs.slot_U[rows_R]
            queries, cos_Q_1_D, sin_Q_1_D = len(at_M), cos_U_1_D[at_M], sin_U_1_D[at_M]
        q_Q_N_D = rotate(ops.q_proj(h_R_H)[:queries].unflatten(1, (heads, -1)), cos_Q_1_D, sin_Q_1_D)
        o_R_ND = document_attention(q_Q_N_D, slot_R, k_U_K_D, v_U_K_D, docs, ops.scaling)
        x_R_H = ops.mlp_residual(x_R_H + ops.o_proj(o_R_ND))
    return norm_op(body.norm)(x_R_H)[:queries]


def products_pad_rows(q_proj: torch.nn.Module, x_U_H: Tensor) -> bool:
    """Whether the layers' products are computed over rows padded to a bucket (`cpu_matmul.rows_best_padded`: on
    oneDNN, which builds a kernel for every row count): the query projection, of the smallest weights but k and
    v, is a plain Linear whose product with x is."""
    return type(q_proj) is torch.nn.Linear and cpu_matmul.rows_best_padded(x_U_H, q_proj.weight)


def padded_index(index_M: Tensor, rows: int) -> Tensor:
    """`index` with its first entry repeated up to `rows` entries: what it selects comes padded with copies of
    its first row. [rows]"""
    if rows == len(index_M):
        return index_M
    return torch.cat([index_M, index_M[:1].expand(rows - len(index_M))])


def document_attention(
    q_Q_N_D: Tensor, slot_R: Tensor, k_U_K_D: Tensor, v_U_K_D: Tensor, docs: Documents, scale: float
) -> Tensor:
    """Causal attention of Q queries over the earlier tokens of their documents, N query heads sharing K
    key/value heads (N a multiple of K). [R, N * D]: one row per entry of `slot_R`.

    `slot_R`: the slots of the queries (distinct, a subset of `docs.slot_U`), then R - Q more slots, whose
    rows repeat those slots' outputs (padding rows, `padded_index`).

    Each document is left-aligned in its own row of [S, heads, Tmax, D] (zeros after it), so `is_causal`
    is the whole mask: no real query sees a slot after its own. A document's repeated tokens take the keys
    and values of the tokens computed for them (`docs.kv_source_N`)."""
    num_docs, max_len = docs.num_docs, docs.max_len

    def padded(x_R_X_D: Tensor, slot_R: Tensor) -> Tensor:
        x_ST_X_D = x_R_X_D.new_zeros(num_docs * max_len, *x_R_X_D.shape[1:]).index_copy(0, slot_R, x_R_X_D)
        return x_ST_X_D.view(num_docs, max_len, *x_R_X_D.shape[1:]).transpose(1, 2)

    if docs.kv_source_N is not None:
        # index_select, whose backward is an index_add_, where an indexed read's is an accumulating index_put: 4x
        # faster on CPU, forward and backward (measured on 2 Xeon cores, [2087, 2, 32] to [2360, 2, 32]: 0.15 ms
        # against 0.61 ms); the training forward gathers rows that carry gradients this way throughout
        k_U_K_D, v_U_K_D = (x.index_select(0, docs.kv_source_N) for x in (k_U_K_D, v_U_K_D))  # now [N, K, D]
    queries, q_heads, dim = q_Q_N_D.shape
    q_S_N_T_D, k_S_K_T_D = padded(q_Q_N_D, slot_R[:queries]), padded(k_U_K_D, docs.kv_slot_N)
    o_S_N_T_D = causal_attention(q_S_N_T_D, k_S_K_T_D, padded(v_U_K_D, docs.kv_slot_N), scale)
    return o_S_N_T_D.transpose(1, 2).reshape(num_docs * max_len, q_heads * dim).index_select(0, slot_R)


def causal_attention(q_S_N_T_D: Tensor, k_S_K_T_D: Tensor, v_S_K_T_D: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale + causal mask) v over S independent rows of T positions, N query heads sharing K
    key/value heads (query head n reads key/value head n // (N / K), as `enable_gqa`). [S, N, T, D].

    On CPU in float32 (no autocast) with short rows (the arithmetic tasks' documents are 8-40 tokens): two
    batched products with the mask as an additive bias, each key/value head's N / K query heads stacked along
    the positions so that keys and values are not repeated, and rows shorter than SOFTMAX_MIN_WIDTH given that
    many keys (zeros, masked out) so that the softmax runs on full vectors (forward and backward of 64 documents
    of 10 positions: 0.50 ms against 0.72 ms). Measured 1.3-2.5x faster than PyTorch's fused CPU
    kernel, forward and backward, for rows up to 64 positions. Longer rows, where the [S * N, T, T] scores
    kept for the backward would cost memory, other devices and other dtypes take the fused kernel."""
    rows, q_heads, width, dim = q_S_N_T_D.shape
    kv_heads = k_S_K_T_D.shape[1]
    short = width <= SHORT_ROW and rows * q_heads * width * width <= SHORT_ATTENTION_SCORES
    float32 = q_S_N_T_D.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    if not short or q_S_N_T_D.device.type != "cpu" or not float32:
        return F.scaled_dot_product_attention(
            q_S_N_T_D, k_S_K_T_D, v_S_K_T_D, is_causal=True, scale=scale, enable_gqa=q_heads != kv_heads
        )
    per_kv = q_heads // kv_heads
    # keys and values padded with zeros to at least SOFTMAX_MIN_WIDTH positions, masked out like later ones
    keys = max(width, SOFTMAX_MIN_WIDTH)
    k_S_K_L_D, v_S_K_L_D = (F.pad(x, (0, 0, 0, keys - width)) for x in (k_S_K_T_D, v_S_K_T_D))
    bias_RT_L = torch.full((width, keys), float("-inf"), device=q_S_N_T_D.device).triu(1).repeat(per_kv, 1)
    scores_SK_RT_L = torch.baddbmm(
        bias_RT_L, q_S_N_T_D.reshape(rows * kv_heads, per_kv * width, dim),
        k_S_K_L_D.reshape(rows * kv_heads, keys, dim).transpose(1, 2), alpha=scale,
    )  # fmt: skip
    o_SK_RT_D = torch.bmm(scores_SK_RT_L.softmax(dim=-1), v_S_K_L_D.reshape(rows * kv_heads, keys, dim))
    return o_SK_RT_D.view(rows, q_heads, width, dim)
