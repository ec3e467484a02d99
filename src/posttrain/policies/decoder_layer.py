"""The one decoder-layer forward that training and both decode paths share, built from a family's adapter.

`layer_ops` reads a transformers decoder layer through its family's adapter (`policies/families/`) into
`LayerOps`, functions of tensors holding the layer's own parameters and modules (plain Linear layers as
`cpu_matmul` products, LoRA layers as their modules), looked up once per forward or generation rather than at
every layer of every step (bench/RESULTS.md, "Kernels"). `layer_forward` runs one layer over X token rows [X, H]:

    q, k, v = attention_inputs(x) = rope(qk_norm(q(n))), rope(qk_norm(k(n))), v(n),   n = in_norm(x)
    x = x + out_norm(o(attend(q, k, v)));  x = x + out_norm(mlp(in_norm(x)))

`attend` is the caller's: the unpadded training forward attends within documents (`policies/unpadded.py`), the
native engine's decoders write keys and values into a static cache and attend over it (`rollout/decoders.py`).
tests/policies/test_families.py holds every adapter's forward equal to transformers' own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain.policies import cpu_matmul
from posttrain.policies.families import family_of
from posttrain.policies.families.adapter import Experts, Family, Norm
from posttrain.policies.kernels import HALF_DTYPES, HalfRMSNorm, RMSNorm, SwiGLUDown

SILUS = frozenset({"SiLUActivation", "SiLU"})

Op = Callable[[Tensor], Tensor]


def identity(x: Tensor) -> Tensor:
    return x


def linear_op(module: torch.nn.Module) -> Op:
    """A Linear layer as a function of x: a plain Linear as `cpu_matmul.linear_of` its weight and bias (the faster
    CPU kernel, no module dispatch), anything else (LoRA) as the module itself, so its own forward runs."""
    if type(module) is torch.nn.Linear:
        return cpu_matmul.linear_of(module.weight, module.bias)
    return module


def norm_op(module: torch.nn.Module, norm: Norm) -> Op:
    """A family's RMSNorm module as a function: in float32 `kernels.RMSNorm` where a gradient is needed, else
    PyTorch's `rms_norm`, with the weight offset + w; in half precision `kernels.HalfRMSNorm` for the norms that
    round before the weight, where a gradient is needed; the module itself otherwise."""
    weight, eps = module.weight, getattr(module, norm.eps)
    effective = weight + norm.offset if norm.offset and weight.dtype == torch.float32 else weight
    shape = weight.shape

    def apply(x: Tensor) -> Tensor:
        grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        if x.dtype == torch.float32 and weight.dtype == torch.float32:
            return RMSNorm.apply(x, effective, eps) if grad else F.rms_norm(x, shape, effective, eps)
        if grad and x.dtype in HALF_DTYPES and norm.round_before_weight and not norm.offset:
            return HalfRMSNorm.apply(x, weight, eps)
        return module(x)

    return apply


def activation_op(module: torch.nn.Module) -> Op:
    """The MLP's activation: SiLU as F.silu, transformers' tanh GELU as the function it wraps, any other as the
    module."""
    if type(module).__name__ in SILUS:
        return F.silu
    return getattr(module, "act", module) if type(module).__name__ == "GELUTanh" else module


SWIGLU_MIN_VALUES = 1 << 20
"""`kernels.SwiGLUDown` saves memory where [X, I] is large; below this many values (4 MB in float32) its overhead
shows more than the saving (bench/RESULTS.md, "Kernels")."""


def gated_down_op(act_fn: torch.nn.Module, down_proj: torch.nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """The MLP after its gate and up products, down(act(gate) * up), as a function of gate and up: through
    `kernels.SwiGLUDown` where a gradient is needed, the activation is SiLU, `down_proj` a plain Linear, autocast
    (if on) leaves the product's dtypes as they are and gate holds at least SWIGLU_MIN_VALUES values; else
    through the ops themselves."""
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


# ---------------------------------------------------------------- RoPE


def rotate(x_X_H_D: Tensor, cos_X_1_R: Tensor, signed_sin_X_1_R: Tensor) -> Tensor:
    """Rotate-half RoPE (Su et al. 2021, arXiv:2104.09864) as transformers applies it, on the first R features of
    each head (all of them but for Phi-3's partial rotary), over any leading axes that broadcast:

        x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x2, x1) = roll(x, R/2) * [-1 .. -1, 1 .. 1]

    taken as one roll and `signed_sin = signed_half(sin)`, made once per forward (fewer ops, the same roundings)."""
    rotary = cos_X_1_R.shape[-1]
    if rotary < x_X_H_D.shape[-1]:
        turned = rotate(x_X_H_D[..., :rotary], cos_X_1_R, signed_sin_X_1_R)
        return torch.cat([turned, x_X_H_D[..., rotary:].to(turned.dtype)], dim=-1)
    rolled = x_X_H_D.roll(rotary // 2, dims=-1)
    return x_X_H_D * cos_X_1_R + rolled * signed_sin_X_1_R


def signed_half(sin_X_D: Tensor) -> Tensor:
    """sin with its first half negated, for `rotate`. [..., D] -> [..., D]"""
    half = sin_X_D.shape[-1] // 2
    return torch.cat((-sin_X_D[..., :half], sin_X_D[..., half:]), dim=-1)


@dataclass(frozen=True)
class Rotary:
    """RoPE angles of X token rows: cos and `signed_half(sin)`, [X, 1, R]."""

    cos_X_1_R: Tensor
    signed_sin_X_1_R: Tensor
    keeps_dtype: bool = False
    """Round the rotated values back to the input's dtype (`Family.rope_keeps_dtype`)."""

    def rotate(self, x_X_H_D: Tensor) -> Tensor:
        out = rotate(x_X_H_D, self.cos_X_1_R, self.signed_sin_X_1_R)
        return out.to(x_X_H_D.dtype) if self.keeps_dtype else out

    def at(self, rows_Q: Tensor) -> Rotary:
        return Rotary(self.cos_X_1_R.index_select(0, rows_Q), self.signed_sin_X_1_R.index_select(0, rows_Q),
                      self.keeps_dtype)  # fmt: skip


def rotary_tables(body: Any, family: Family, x: Tensor, positions: Tensor) -> dict[str | None, tuple[Tensor, Tensor]]:
    """cos and `signed_half(sin)` [P, T, R] of the model's own rotary module at `positions` [P, T] (so every RoPE
    scaling it implements is reproduced; dynamic scaling reads their max), per RoPE key (`LayerOps.rope_key`)."""
    if not family.rope_by_layer_type:
        cos, sin = body.rotary_emb(x, positions)
        return {None: (cos, signed_half(sin))}
    tables = {}
    for layer_type in sorted(set(body.config.layer_types)):
        cos, sin = body.rotary_emb(x, positions, layer_type)
        tables[layer_type] = (cos, signed_half(sin))
    return tables


# ---------------------------------------------------------------- one layer


@dataclass(frozen=True)
class LayerOps:
    """One decoder layer's maths as functions of tensors over X token rows (see the module docstring). They hold
    the model's own parameters and modules, so they compute with the weights as they are when called."""

    attention_inputs: Callable[[Tensor, Rotary, Tensor | None], tuple[Tensor, Tensor, Tensor]]
    """x [X, H], its rows' RoPE angles, the rows Q that need queries (None: all) -> the queries [Q, N, D], keys
    [X, G, D] (both q/k-normed where the family norms them, then rotated) and values [X, G, D]."""
    attention_residual: Callable[[Tensor, Tensor], Tensor]
    """x [Q, H], attention output [Q, N*D] -> x + out_norm(o(output))."""
    mlp_residual: Op
    """x [Q, H] -> x + out_norm(mlp(in_norm(x)))."""
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    softcap: float | None
    window: int | None
    rope_key: str | None


class Attend(Protocol):
    def __call__(self, q_Q_N_D: Tensor, k_X_G_D: Tensor, v_X_G_D: Tensor, ops: LayerOps) -> Tensor:
        """Attention of the queries over their keys and values. [Q, N*D]"""
        ...


def layer_forward(ops: LayerOps, x_X_H: Tensor, rope: Rotary, attend: Attend, reads_Q: Tensor | None = None) -> Tensor:
    """One decoder layer over X token rows [X, H]. With `reads_Q` (indices into X) keys and values are computed at
    every row but queries, the output projection and the MLP at those rows only, which it returns [Q, H] (the last
    layer of a forward whose caller reads a few positions); else [X, H]."""
    q_Q_N_D, k_X_G_D, v_X_G_D = ops.attention_inputs(x_X_H, rope, reads_Q)
    if reads_Q is not None:
        x_X_H = x_X_H.index_select(0, reads_Q)
    x_X_H = ops.attention_residual(x_X_H, attend(q_Q_N_D, k_X_G_D, v_X_G_D, ops))
    return ops.mlp_residual(x_X_H)


def layer_ops(layer: torch.nn.Module, family: Family, config: Any, index: int) -> LayerOps:
    """The `LayerOps` of decoder layer `index` of a model of this family."""
    attn, mlp = layer.self_attn, layer.mlp
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, attn.head_dim

    def norm(name: str | None, owner: torch.nn.Module = layer) -> Op:
        return identity if name is None else norm_op(getattr(owner, name), family.norm)

    attention_in, attention_out = norm(family.attention_in_norm), norm(family.attention_out_norm)
    mlp_in, mlp_out = norm(family.mlp_in_norm), norm(family.mlp_out_norm)
    projections = [linear_op(getattr(attn, name)) for name in family.qkv]
    widths = [heads * dim, kv_heads * dim, kv_heads * dim]
    query_heads = heads_op(family, attn, "q_norm", heads, dim)
    key_heads = heads_op(family, attn, "k_norm", kv_heads, dim)

    def attention_inputs(x_X_H: Tensor, rope: Rotary, reads_Q: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        h_X_H = attention_in(x_X_H)
        # keys and values before queries: the order autograd sums their gradients in, kept from the forwards before
        if len(projections) == 1:
            q_X_F, k_X_F, v_X_F = projections[0](h_X_H).split(widths, dim=-1)
            k_X_G_D, v_X_G_D = rope.rotate(key_heads(k_X_F)), v_X_F.unflatten(-1, (kv_heads, dim))
            q_Q_F = q_X_F if reads_Q is None else q_X_F.index_select(0, reads_Q)
        else:
            q_proj, k_proj, v_proj = projections
            k_X_G_D = rope.rotate(key_heads(k_proj(h_X_H)))
            v_X_G_D = v_proj(h_X_H).unflatten(-1, (kv_heads, dim))
            q_Q_F = q_proj(h_X_H if reads_Q is None else h_X_H.index_select(0, reads_Q))
        q_rope = rope if reads_Q is None else rope.at(reads_Q)
        return q_rope.rotate(query_heads(q_Q_F)), k_X_G_D, v_X_G_D

    o_proj = linear_op(attn.o_proj)

    def attention_residual(x_Q_H: Tensor, o_Q_F: Tensor) -> Tensor:
        return x_Q_H + attention_out(o_proj(o_Q_F))

    def mlp_residual(x_Q_H: Tensor) -> Tensor:
        h_Q_H = mlp_in(x_Q_H)
        if routed is not None:
            return x_Q_H + mlp_out(routed(h_Q_H))
        if family.mlp_block:  # the model's own block, routing and all, over the rows as one sequence
            return x_Q_H + mlp_out(mlp(h_Q_H[None])[0])
        gate_Q_I, up_Q_I = gate_up[0](h_Q_H).chunk(2, dim=-1) if len(gate_up) == 1 else (f(h_Q_H) for f in gate_up)
        return x_Q_H + mlp_out(gated_down(gate_Q_I, up_Q_I))

    routed = experts_op(mlp, family.experts, config) if family.experts is not None else None
    if not family.mlp_block:
        gate_up = [linear_op(getattr(mlp, name)) for name in family.gate_up]
        gated_down = gated_down_op(getattr(mlp, family.activation), mlp.down_proj)

    softcap = getattr(config, family.attention_softcap, None) if family.attention_softcap else None
    rope_key = config.layer_types[index] if family.rope_by_layer_type else None
    return LayerOps(
        attention_inputs, attention_residual, mlp_residual, heads, kv_heads, dim, attn.scaling, softcap,
        family.window(config, index), rope_key,
    )  # fmt: skip


# ---------------------------------------------------------------- mixtures of experts


def experts_op(block: torch.nn.Module, experts: Experts, config: Any) -> Op | None:
    """A sparse MLP block as a function of its tokens [X, H] -> [X, H] (`Experts`, for the formula): each token's k
    (token, expert) pairs sorted by expert, the experts' products as one grouped product over their tokens
    (`F.grouped_mm`), the weighted outputs summed back into their tokens by `index_add`. transformers' own grouped
    path gathers and un-permutes by indexed reads, whose backward is an accumulating `index_put` (bench/RESULTS.md,
    "Model families"). None (the block runs as its own module) where this does not apply: another module type, off
    the CPU, experts with biases, transposed or interleaved weights or expert parallelism, or widths whose rows are not
    the 16-byte multiples `grouped_mm` needs."""
    if type(block).__name__ not in experts.block_types or not hasattr(F, "grouped_mm"):
        return None
    router, bank = block.gate, block.experts
    gate_up_E_F_H, down_E_H_I = bank.gate_up_proj, bank.down_proj
    standard = getattr(bank, "has_gate", True) and getattr(bank, "is_concatenated", True)
    unusual = getattr(bank, "has_bias", False) or getattr(bank, "is_transposed", False) or getattr(
        bank, "_is_expert_parallel", False) or getattr(bank, "has_post_expert_norm", False)  # fmt: skip
    widths = (gate_up_E_F_H.shape[-1], down_E_H_I.shape[-1])
    aligned = all(width * gate_up_E_F_H.element_size() % 16 == 0 for width in widths)
    if not standard or unusual or not aligned or gate_up_E_F_H.device.type != "cpu":
        return None
    num_experts, top_k, normalises = gate_up_E_F_H.shape[0], router.top_k, experts.normalises(config)
    act = activation_op(bank.act_fn)
    shared = shared_gate = None
    if experts.shared_expert:
        shared_mlp = block.shared_expert
        shared_gate_up = [linear_op(shared_mlp.gate_proj), linear_op(shared_mlp.up_proj)]
        shared_down = gated_down_op(shared_mlp.act_fn, shared_mlp.down_proj)
        shared_gate = linear_op(block.shared_expert_gate)

        def shared(x_X_H: Tensor) -> Tensor:
            return shared_down(*(f(x_X_H) for f in shared_gate_up))

    def routed(x_X_H: Tensor) -> Tensor:
        logits_X_E = F.linear(x_X_H, router.weight)
        top_X_K, expert_X_K = logits_X_E.float().softmax(dim=-1).topk(top_k, dim=-1)
        if normalises:
            top_X_K = top_X_K / top_X_K.sum(dim=-1, keepdim=True)
        if not experts.weights_in_float32:
            top_X_K = top_X_K.to(logits_X_E.dtype)
        expert_S = expert_X_K.flatten()  # S = X * k pairs, token-major
        order_S = expert_S.argsort(stable=True)
        token_S = order_S.div(top_k, rounding_mode="floor")
        ends_E = torch.bincount(expert_S, minlength=num_experts).cumsum(0, dtype=torch.int32)
        gate_up_S_F = F.grouped_mm(x_X_H.index_select(0, token_S), gate_up_E_F_H.transpose(1, 2), offs=ends_E)
        gate_S_I, up_S_I = gate_up_S_F.chunk(2, dim=-1)
        y_S_H = F.grouped_mm(act(gate_S_I) * up_S_I, down_E_H_I.transpose(1, 2), offs=ends_E)
        y_S_H = y_S_H * top_X_K.flatten().index_select(0, order_S)[:, None]
        out_X_H = y_S_H.new_zeros(x_X_H.shape).index_add(0, token_S, y_S_H).to(x_X_H.dtype)
        if shared is not None:
            out_X_H = out_X_H + torch.sigmoid(shared_gate(x_X_H)) * shared(x_X_H)
        return out_X_H

    return routed


def heads_op(family: Family, attn: torch.nn.Module, name: str, heads: int, dim: int) -> Op:
    """[X, heads * D] -> [X, heads, D], through the family's q or k norm (per head or over the projection)."""
    if family.qk_norm is None:
        return lambda x: x.unflatten(-1, (heads, dim))
    norm = norm_op(getattr(attn, name), family.norm)
    if family.qk_norm == "head":
        return lambda x: norm(x.unflatten(-1, (heads, dim)))
    return lambda x: norm(x).unflatten(-1, (heads, dim))


def final_softcap(model: Any) -> float | None:
    """The cap c of the model's final logits, c tanh(logits / c) (Gemma 2 and 3), or None: where its family's
    adapter says (`Family.final_softcap`), else at transformers' own name for it, `final_logit_softcapping`."""
    family = family_of(model)
    name = "final_logit_softcapping" if family is None else family.final_softcap
    return (getattr(model.config, name, None) or None) if name else None
