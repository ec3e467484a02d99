"""The native engine's two ways to run a causal LM incrementally: prefill, expand, select rows, decode.

`HFCacheDecoder` works with any Hugging Face causal LM: it calls the model's own forward with a
`DynamicCache`. `StaticCacheDecoder` is the fast path for every family with an adapter (`policies/families/`):
it runs the layer forward that training shares (`policies/decoder_layer.py`) over a KV cache preallocated for
the whole generation (prompt width + max_new_tokens), so a decode step is a few matmuls per layer with no
per-step mask building, cache concatenation or module dispatch. It reads the model's own modules, looked up
once per generation (a decoder lives for one), so it follows the weights as they train. A small float32 model on
CPU decodes through packed layer ops (`packed_layers`) instead. tests/rollout/test_decoders.py and
tests/policies/test_families.py hold its logits equal to the model's forward, prompts left-padded, rows leaving
the batch, sliding windows shorter than the sequence.

`GraphedDecoder` is the same decoder with one shape and one set of buffers for every decode step, so that
on a GPU the step is captured once as a CUDA graph and replayed (POSTTRAIN_CUDA_GRAPHS=1; off by default
until measured on a GPU, issue #7). On CPU its step runs eagerly and is tested equal to `StaticCacheDecoder`'s.

Both keep rows left-aligned to one prompt width: row a's token at decode step s sits in cache slot
`width + s`, padding slots are masked out, and positions count real tokens only
(`positions_from_mask`), so a padded prompt sees what it would see alone; a layer's sliding window counts
slots, which are positions for every real token.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache

from posttrain.policies.decoder_layer import (
    LayerOps,
    Rotary,
    activation_op,
    final_softcap,
    layer_forward,
    layer_ops,
    linear_op,
    norm_op,
    rotary_tables,
)
from posttrain.policies.families import base_model, decoder_of, decoding_refusal, family_of
from posttrain.policies.families.adapter import Family, Norm
from posttrain.policies.kernels import grouped_attention, grouped_bias, soft_cap


def positions_from_mask(attention_mask_B_T: Tensor) -> Tensor:
    """Position ids under left padding: real tokens count 0, 1, 2, ...; padding gets 0. [B, T] -> [B, T]."""
    return (attention_mask_B_T.cumsum(dim=-1) - 1).clamp(min=0)


class Decoder(Protocol):
    """Incremental decoding state for A active rows."""

    def prefill(self, input_ids_P_T: Tensor, attention_mask_P_T: Tensor) -> Tensor:
        """Run the left-padded prompts once. Returns the last position's logits_P_V (float32)."""
        ...

    def expand(self, n: int) -> None:
        """Repeat every row n times, contiguously (row i -> rows i*n .. i*n + n - 1)."""
        ...

    def select(self, keep_A: Tensor) -> None:
        """Keep only the rows `keep_A` (indices into the current rows), in that order."""
        ...

    def step(self, tokens_A: Tensor) -> Tensor:
        """Feed one token per active row. Returns logits_A_V (float32) for the next token."""
        ...


class HFCacheDecoder:
    """Any causal LM through its own forward and a `DynamicCache` (the general path)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name warns until 5.40)
        forward = inspect.signature(base_model(model).forward).parameters
        self.cache_kwarg = "cache" if "cache" in forward else "past_key_values"

    def prefill(self, input_ids_P_T: Tensor, attention_mask_P_T: Tensor) -> Tensor:
        self.cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=input_ids_P_T,
            attention_mask=attention_mask_P_T,
            position_ids=positions_from_mask(attention_mask_P_T),
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_kwarg: self.cache},
        )
        self.cache = out[self.cache_kwarg]
        self.attention_mask_A_T = attention_mask_P_T
        self.positions_A = attention_mask_P_T.sum(dim=-1)  # next position = number of real prompt tokens
        return out.logits[:, -1].float()

    def expand(self, n: int) -> None:
        self.cache.batch_repeat_interleave(n)
        self.attention_mask_A_T = self.attention_mask_A_T.repeat_interleave(n, dim=0)
        self.positions_A = self.positions_A.repeat_interleave(n, dim=0)

    def select(self, keep_A: Tensor) -> None:
        self.cache.batch_select_indices(keep_A)
        self.attention_mask_A_T, self.positions_A = self.attention_mask_A_T[keep_A], self.positions_A[keep_A]

    def step(self, tokens_A: Tensor) -> Tensor:
        mask = self.attention_mask_A_T
        self.attention_mask_A_T = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=-1)
        out = self.model(
            input_ids=tokens_A[:, None],
            attention_mask=self.attention_mask_A_T,
            position_ids=self.positions_A[:, None],
            use_cache=True,
            **{self.cache_kwarg: self.cache},
        )
        self.positions_A = self.positions_A + 1
        return out.logits[:, -1].float()


def supports_static(model: Any) -> bool:
    """Whether `StaticCacheDecoder` reproduces this model's forward (`families.decoding_refusal`: a family with an
    adapter, RoPE frequencies that do not depend on the positions seen, no forward hooks)."""
    return decoding_refusal(model) is None


Store = Callable[[Tensor, Tensor], Tensor]


@dataclass
class CacheStep:
    """What one forward over the static cache needs besides its tokens: `store(cache, new)` writes a layer's new
    keys or values [A, G, S, D] into its cache and returns the slots to attend to; `masks` holds, per sliding
    window (None: none), a boolean [A, 1, S, K] mask for a prefill, or an additive bias [A * G, 1, K] for one
    decoded token per row."""

    rows: int
    decoding: bool
    store: Store
    masks: dict[int | None, Tensor]
    grouped: dict[int | None, Tensor] = field(default_factory=dict)
    """Prefill masks as `grouped_attention` biases, made on first use (soft-capped layers)."""


def cache_attention(
    step: CacheStep, keys_A_G_K_D: Tensor, values_A_G_K_D: Tensor, q_X_N_D: Tensor, k_X_G_D: Tensor, v_X_G_D: Tensor,
    ops: LayerOps,
) -> Tensor:  # fmt: skip
    """The static decoder's attention step: the new keys and values of X = A * S rows (S new tokens in each of A
    rows) go into the layer's cache, and the queries attend over its written slots. [X, N * D]

    One query per row: `grouped_attention` over the cache with the step's bias (plain batched products beat the
    fused CPU kernel's per-call set-up there); a prefill: PyTorch's fused kernel with the boolean mask, or
    `grouped_attention` where scores are soft-capped."""
    rows, heads, kv_heads, dim = step.rows, ops.heads, ops.kv_heads, ops.head_dim
    new = q_X_N_D.shape[0] // rows
    keys_A_G_K_D = step.store(keys_A_G_K_D, k_X_G_D.view(rows, new, kv_heads, dim).transpose(1, 2))
    values_A_G_K_D = step.store(values_A_G_K_D, v_X_G_D.view(rows, new, kv_heads, dim).transpose(1, 2))
    q_A_N_S_D = q_X_N_D.view(rows, new, heads, dim).transpose(1, 2)
    mask = step.masks[ops.window]
    if step.decoding:
        o_A_N_S_D = grouped_attention(q_A_N_S_D, keys_A_G_K_D, values_A_G_K_D, mask, ops.scaling, ops.softcap)
    elif ops.softcap is not None:
        if ops.window not in step.grouped:
            bias_A_1_S_K = torch.zeros(mask.shape, dtype=q_X_N_D.dtype, device=mask.device)
            bias_A_1_S_K.masked_fill_(~mask, -torch.inf)
            step.grouped[ops.window] = grouped_bias(bias_A_1_S_K, kv_heads, heads // kv_heads)
        bias = step.grouped[ops.window]
        o_A_N_S_D = grouped_attention(q_A_N_S_D, keys_A_G_K_D, values_A_G_K_D, bias, ops.scaling, ops.softcap)
    else:
        o_A_N_S_D = F.scaled_dot_product_attention(
            q_A_N_S_D, keys_A_G_K_D, values_A_G_K_D, attn_mask=mask, scale=ops.scaling, enable_gqa=heads != kv_heads
        )
    return o_A_N_S_D.transpose(1, 2).reshape(rows * new, heads * dim)


def windowed(bias_X_1_K: Tensor, slots_K: Tensor, slot: int | Tensor, window: int | None) -> Tensor:
    """A decode step's bias with the slots at or before `slot - window` hidden (the new token, at `slot`, sees the
    window - 1 slots before it); the bias itself without a window. `slot` may be a tensor of one element."""
    if window is None:
        return bias_X_1_K
    return bias_X_1_K.masked_fill(slots_K <= slot - window, -torch.inf)


def slots_from(start: int) -> Store:
    """The static decoder's cache write: S new entries at slots start .. start + S - 1; attend to the slots
    written so far (< start + S)."""

    def store(cache_A_G_K_D: Tensor, new_A_G_S_D: Tensor) -> Tensor:
        end = start + new_A_G_S_D.shape[2]
        cache_A_G_K_D[:, :, start:end] = new_A_G_S_D
        return cache_A_G_K_D[:, :, :end]

    return store


def written_rows(cache_A_G_K_D: Tensor, keep_R: Tensor, written: int) -> Tensor:
    """The rows `keep_R` (increasing, as rows only leave) of a cache whose first `written` slots hold keys or
    values, moved to its first R rows in place: a view of those, no new cache. Only the written slots are copied;
    every later slot is written before a step reads it (a new cache per selection costs its first touch of new
    memory, bench/RESULTS.md "Kernels"). [R, G, K, D]"""
    cache_A_G_K_D[: len(keep_R), :, :written] = cache_A_G_K_D[:, :, :written].index_select(0, keep_R)
    return cache_A_G_K_D[: len(keep_R)]


PACK_MAX_VALUES = 1 << 22
"""Packed layer ops are made for a float32 CPU model whose layer and head weights hold at most this many values (16
MB of copies): its decode step is bound by per-op overhead (`python bench/packed_decode.py`, bench/RESULTS.md
"Kernels"); above it the copies would lift generation's peak memory above transformers `generate`'s."""


@torch.no_grad()
def packed_layers(model: Any, family: Family, layers: list[torch.nn.Module]) -> list[LayerOps] | None:
    """`LayerOps` of the model's layers for a decode step of a small model on CPU, where the step's time is the
    number of ops (each some microseconds) more than their arithmetic:

    - q, k and v are one product (their weights stacked), and so are gate and up;
    - each RMSNorm before attention or the MLP is moved past the products that read it, which are linear: with
      x_hat = x r (offset + w), where r = (mean(x^2) + eps)^-1/2, x_hat W = (x W') r', with
      W' = diag(offset + w) W sqrt(H) made once and r' = (|x|^2 + H eps)^-1/2 one dot product per row, applied to
      the product's output with its bias (`_normed_product`); the final norm likewise into the LM head;
    - o and down add into the residual stream inside their product (addmm), when they have no bias.

    None where packing does not apply: off the CPU, not float32, a family with norms after attention or the MLP,
    with q/k norms or with a mixture of experts, a layer with other than plain Linear projections (LoRA), or weights
    over PACK_MAX_VALUES. The weights do not
    change within a generation; they are held transposed, [in, out]. Equal to the unpacked step up to float
    rounding: tests/rollout/test_decoders.py."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.weight.device.type != "cpu" or head.weight.dtype != torch.float32:
        return None
    if family.attention_out_norm or family.mlp_out_norm or not (family.attention_in_norm and family.mlp_in_norm):
        return None
    if family.mlp_block or family.qk_norm is not None:  # q/k norms: packing gained 1.5% (RESULTS.md, "Kernels")
        return None
    values = sum(m.weight.numel() for layer in layers for m in layer.modules() if type(m) is torch.nn.Linear)
    if values + head.weight.numel() > PACK_MAX_VALUES or not all(_packable(layer, family) for layer in layers):
        return None
    return [_pack(layer, family, model.config, index) for index, layer in enumerate(layers)]


def _packable(layer: torch.nn.Module, family: Family) -> bool:
    attn, mlp = layer.self_attn, layer.mlp
    linears = [getattr(attn, n) for n in (*family.qkv, "o_proj")]
    linears += [getattr(mlp, n) for n in (*family.gate_up, "down_proj")]
    norms = (getattr(layer, family.attention_in_norm), getattr(layer, family.mlp_in_norm))
    return all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 for m in linears) and all(
        n.weight.dtype == torch.float32 for n in norms
    )


def _pack(layer: torch.nn.Module, family: Family, config: Any, index: int) -> LayerOps:
    plain = layer_ops(layer, family, config, index)
    attn, mlp, norm = layer.self_attn, layer.mlp, family.norm
    input_norm, post_norm = getattr(layer, family.attention_in_norm), getattr(layer, family.mlp_in_norm)
    qkv = [getattr(attn, name) for name in family.qkv]
    gate_up = [getattr(mlp, name) for name in family.gate_up]
    qkv_weight, qkv_bias = normed_weight(torch.cat([m.weight for m in qkv]), input_norm, norm), _stacked_bias(qkv)
    gate_up_weight = normed_weight(torch.cat([m.weight for m in gate_up]), post_norm, norm)
    gate_up_bias = _stacked_bias(gate_up)
    o_weight, o_bias = attn.o_proj.weight.T, attn.o_proj.bias
    down_weight, down_bias = mlp.down_proj.weight.T, mlp.down_proj.bias
    input_offset, post_offset = norm_offset(input_norm, norm), norm_offset(post_norm, norm)
    heads, kv_heads, dim = plain.heads, plain.kv_heads, plain.head_dim
    act = activation_op(getattr(mlp, family.activation))

    def attention_inputs(x_A_H: Tensor, rope: Rotary, reads_Q: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        qkv_A_F = _normed_product(x_A_H, _inverse_norm(x_A_H, input_offset), qkv_weight, qkv_bias)
        v_A_G_D = qkv_A_F[:, (heads + kv_heads) * dim :].view(-1, kv_heads, dim)
        # q and k, adjacent in the stacked output, rotated together
        qk_A_NG_D = rope.rotate(qkv_A_F[:, : (heads + kv_heads) * dim].view(-1, heads + kv_heads, dim))
        return qk_A_NG_D[:, :heads], qk_A_NG_D[:, heads:], v_A_G_D

    def mlp_residual(x_A_H: Tensor) -> Tensor:
        gate_up_A_F = _normed_product(x_A_H, _inverse_norm(x_A_H, post_offset), gate_up_weight, gate_up_bias)
        gate_A_I, up_A_I = gate_up_A_F.chunk(2, dim=-1)
        return _add_product(x_A_H, act(gate_A_I) * up_A_I, down_weight, down_bias)

    return replace(
        plain, attention_inputs=attention_inputs, mlp_residual=mlp_residual,
        attention_residual=lambda x_A_H, o_A_F: _add_product(x_A_H, o_A_F, o_weight, o_bias),
    )  # fmt: skip


def normed_weight(weight_N_H: Tensor, module: torch.nn.Module, norm: Norm) -> Tensor:
    """W' = diag(offset + w) W sqrt(H) of the product that reads an RMSNorm (weight w) of H features, transposed.
    [H, N]"""
    return (weight_N_H * ((module.weight + norm.offset) * module.weight.shape[0] ** 0.5)).T


def norm_offset(module: torch.nn.Module, norm: Norm) -> float:
    """H eps of an RMSNorm of H features: r' = (|x|^2 + H eps)^-1/2 = r / sqrt(H)."""
    return module.weight.shape[0] * getattr(module, norm.eps)


def _stacked_bias(linears: list[torch.nn.Linear]) -> Tensor | None:
    if all(m.bias is None for m in linears):
        return None
    return torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in linears])


def _inverse_norm(x_A_H: Tensor, offset: float) -> Tensor:
    """r' = (|x|^2 + offset)^-1/2 per row. [A, 1]"""
    return torch.linalg.vecdot(x_A_H, x_A_H).add_(offset).rsqrt_().unsqueeze_(-1)


def _normed_product(x_A_H: Tensor, inverse_norm_A_1: Tensor, weight_H_N: Tensor, bias_N: Tensor | None) -> Tensor:
    """(x @ weight) r' + bias: the product of the RMSNorm of x whose weight `weight` holds (`normed_weight`)."""
    product_A_N = torch.mm(x_A_H, weight_H_N)
    if bias_N is None:
        return product_A_N.mul_(inverse_norm_A_1)
    return torch.addcmul(bias_N, product_A_N, inverse_norm_A_1)


def _add_product(x_A_N: Tensor, a_A_K: Tensor, weight_K_N: Tensor, bias_N: Tensor | None) -> Tensor:
    """x + a @ weight + bias, the sum inside the product where there is no bias."""
    if bias_N is None:
        return torch.addmm(x_A_N, a_A_K, weight_K_N)
    return x_A_N + torch.addmm(bias_N, a_A_K, weight_K_N)


class StaticCacheDecoder:
    """Decoding over a preallocated KV cache through the shared layer forward; see the module docstring.

    Cache tensors are [A, kv_heads, slots, head_dim] per layer with slots = prompt width + max_new_tokens;
    `bias_A_G_1_K` is 0 at slots holding real tokens and -inf at the prompt's padding, built once in the
    prefill (a decoded slot is always real, and a step reads only the slots written so far); a layer with a
    sliding window also hides the slots before its window (`windowed`).
    """

    def __init__(self, model: Any, max_new_tokens: int) -> None:
        self.model = base_model(model)
        self.body = decoder_of(self.model)
        self.head = self.model.get_output_embeddings()
        family = family_of(self.model)
        self.family, config = family, self.model.config
        layers = list(self.body.layers[: config.num_hidden_layers])
        # the layers' maths looked up once for the whole generation, in which the weights do not change
        self.layers = [layer_ops(layer, family, config, index) for index, layer in enumerate(layers)]
        self.final_norm, self.lm_head = norm_op(self.body.norm, family.norm), linear_op(self.head)
        self.softcap = final_softcap(self.model)
        self.windows = sorted({ops.window for ops in self.layers}, key=lambda w: -1 if w is None else w)
        self.packed = packed_layers(self.model, family, layers)
        if self.packed is not None:
            with torch.no_grad():
                self.packed_head_weight = normed_weight(self.head.weight, self.body.norm, family.norm)
            self.packed_head_offset = norm_offset(self.body.norm, family.norm)
        self.num_kv_heads, self.head_dim = self.layers[0].kv_heads, self.layers[0].head_dim
        self.max_new_tokens = max_new_tokens

    def prefill(self, input_ids_P_T: Tensor, attention_mask_P_T: Tensor) -> Tensor:
        num_prompts, width = input_ids_P_T.shape
        slots = width + self.max_new_tokens
        weight = self.head.weight
        shape = (num_prompts, self.num_kv_heads, slots, self.head_dim)
        self.keys = [weight.new_zeros(shape) for _ in self.layers]
        self.values = [weight.new_zeros(shape) for _ in self.layers]
        positions_1_K = torch.arange(slots, device=weight.device)[None]
        tables = rotary_tables(self.body, self.family, weight.new_zeros(1), positions_1_K)
        self.tables = {key: (cos_1_K_D[0], sin_1_K_D[0]) for key, (cos_1_K_D, sin_1_K_D) in tables.items()}
        real_P_T = attention_mask_P_T.bool()
        self.bias_A_G_1_K = weight.new_zeros(num_prompts, self.num_kv_heads, 1, slots)
        self.bias_A_G_1_K[..., :width].masked_fill_(~real_P_T[:, None, None], float("-inf"))
        self.slot = width
        self.slots_K = positions_1_K[0]
        # causal, within the window and not padding; a padding query may see itself so that no softmax row is empty
        i_T_1, j_1_T = self.slots_K[:width, None], self.slots_K[None, :width]
        eye_T_T = i_T_1 == j_1_T
        masks = {}
        for window in self.windows:
            seen_T_T = (j_1_T <= i_T_1) if window is None else (j_1_T <= i_T_1) & (j_1_T > i_T_1 - window)
            masks[window] = ((seen_T_T & real_P_T[:, None, :]) | eye_T_T)[:, None]
        positions_P_T = positions_from_mask(attention_mask_P_T)
        self.positions_A = real_P_T.sum(dim=-1)
        return self._forward(input_ids_P_T, positions_P_T, CacheStep(num_prompts, False, slots_from(0), masks))

    def expand(self, n: int) -> None:
        self.keys = [k.repeat_interleave(n, dim=0) for k in self.keys]
        self.values = [v.repeat_interleave(n, dim=0) for v in self.values]
        self.bias_A_G_1_K = self.bias_A_G_1_K.repeat_interleave(n, dim=0)
        self.positions_A = self.positions_A.repeat_interleave(n, dim=0)

    def select(self, keep_A: Tensor) -> None:
        self.keys = [written_rows(k, keep_A, self.slot) for k in self.keys]
        self.values = [written_rows(v, keep_A, self.slot) for v in self.values]
        self.bias_A_G_1_K, self.positions_A = self.bias_A_G_1_K[keep_A], self.positions_A[keep_A]

    def step(self, tokens_A: Tensor) -> Tensor:
        bias_AG_1_K = self.bias_A_G_1_K[..., : self.slot + 1].flatten(0, 1)  # a view: A and G are contiguous
        slots_K = self.slots_K[: self.slot + 1]
        masks = {window: windowed(bias_AG_1_K, slots_K, self.slot, window) for window in self.windows}
        step = CacheStep(len(tokens_A), True, slots_from(self.slot), masks)
        logits_A_V = self._forward(tokens_A[:, None], self.positions_A[:, None], step)
        self.slot += 1
        self.positions_A = self.positions_A + 1
        return logits_A_V

    def _forward(self, ids_A_S: Tensor, positions_A_S: Tensor, step: CacheStep) -> Tensor:
        """S new tokens per row through every layer (`layer_forward`, attending by `cache_attention`). Returns the
        last new position's logits_A_V (float32)."""
        rows, new = ids_A_S.shape
        packed = step.decoding and self.packed is not None
        positions_X = positions_A_S.flatten()
        ropes = {
            key: Rotary(cos_K_D[positions_X][:, None], sin_K_D[positions_X][:, None], self.family.rope_keeps_dtype)
            for key, (cos_K_D, sin_K_D) in self.tables.items()
        }
        x_X_H = self.body.embed_tokens(ids_A_S.flatten())
        for ops, keys, values in zip(self.packed if packed else self.layers, self.keys, self.values):
            x_X_H = layer_forward(ops, x_X_H, ropes[ops.rope_key], partial(cache_attention, step, keys, values))
        x_A_H = x_X_H.view(rows, new, -1)[:, -1]
        if packed:
            logits_A_V = _normed_product(x_A_H, _inverse_norm(x_A_H, self.packed_head_offset), self.packed_head_weight,
                                         self.head.bias)  # fmt: skip
        else:
            logits_A_V = self.lm_head(self.final_norm(x_A_H))
        return soft_cap(logits_A_V, self.softcap).float()


class GraphedDecoder:
    """The static-cache decoder with one shape and one set of buffers for every decode step, so that on a GPU
    the step is recorded once as a CUDA graph and replayed with one launch.

    A decode step of a model of up to a few billion parameters is launch-bound on a GPU (some 40 kernels a layer,
    issue #7). A graph needs the same shapes and addresses at every replay, so here:

    - every row stays in the batch to the end; `select` only changes which rows' logits `step` returns, and a
      finished row's last token is fed again (on a GPU a step reads all the weights whatever the batch, so
      dropping rows would save little);
    - attention reads every cache slot, the slots not written yet masked out by an additive bias that each
      step opens at its slot (a sliding window's layers also hide the slots before their window, `windowed`);
    - keys, values, the bias, positions and the slot counter are written in place at indices held in tensors,
      and the logits into a buffer of the decoder's own (a graph must own its static buffers, DESIGN.md).

    `capture`: record the step as a CUDA graph (a CUDA model only); without it the same step runs eagerly.
    The prefill runs eagerly either way, through `StaticCacheDecoder`.
    """

    WARMUP_STEPS = 2
    """Eager steps on a side stream before the capture, as torch.cuda.graphs requires (lazy library set-up)."""

    def __init__(self, model: Any, max_new_tokens: int, *, capture: bool) -> None:
        self.inner = StaticCacheDecoder(model, max_new_tokens)
        self.capture = capture
        self.graph: Any = None
        self.active_A: Tensor | None = None

    def prefill(self, input_ids_P_T: Tensor, attention_mask_P_T: Tensor) -> Tensor:
        return self.inner.prefill(input_ids_P_T, attention_mask_P_T)

    def expand(self, n: int) -> None:
        self.inner.expand(n)

    def select(self, keep_A: Tensor) -> None:
        self._static_buffers()
        self.active_A = self.active_A[keep_A]

    def step(self, tokens_A: Tensor) -> Tensor:
        self._static_buffers()
        self.tokens_R.index_copy_(0, self.active_A, tokens_A)
        if self.capture and self.graph is None:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step_in_place()
        return self.logits_R_V[self.active_A]

    def _static_buffers(self) -> None:
        """The step's inputs and outputs, made once after the prefill and expansion: R rows, all of them."""
        if self.active_A is not None:
            return
        inner = self.inner
        rows = len(inner.positions_A)
        device = inner.positions_A.device
        self.active_A = torch.arange(rows, device=device)
        self.tokens_R = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions_R = inner.positions_A.clone()
        self.slot_1 = torch.tensor([inner.slot], device=device)
        inner.bias_A_G_1_K[..., inner.slot :] = float("-inf")  # slots no step has written yet
        self.bias_RG_1_K = inner.bias_A_G_1_K.flatten(0, 1)  # a view, opened in place slot by slot
        self.logits_R_V = torch.zeros(rows, inner.head.weight.shape[0], dtype=torch.float32, device=device)

    def _store(self, cache_R_G_K_D: Tensor, new_R_G_1_D: Tensor) -> Tensor:
        return cache_R_G_K_D.index_copy_(2, self.slot_1, new_R_G_1_D)

    def _step_in_place(self) -> None:
        """One decode step of every row, reading and writing only the static buffers (what a graph replays)."""
        self.bias_RG_1_K.index_fill_(-1, self.slot_1, 0.0)
        tokens_R_1, positions_R_1 = self.tokens_R[:, None], self.positions_R[:, None]
        inner = self.inner
        masks = {w: windowed(self.bias_RG_1_K, inner.slots_K, self.slot_1, w) for w in inner.windows}
        step = CacheStep(len(self.tokens_R), True, self._store, masks)
        logits_R_V = inner._forward(tokens_R_1, positions_R_1, step)
        self.logits_R_V.copy_(logits_R_V)
        self.positions_R.add_(1)
        self.slot_1.add_(1)

    def _undo_step(self) -> None:
        """Back to before `_step_in_place`: the keys and values it wrote sit at the slot the next step rewrites."""
        self.positions_R.sub_(1)
        self.slot_1.sub_(1)
        self.bias_RG_1_K.index_fill_(-1, self.slot_1, float("-inf"))

    def _capture(self) -> None:
        stream = torch.cuda.Stream(device=self.tokens_R.device)
        stream.wait_stream(torch.cuda.current_stream(self.tokens_R.device))
        with torch.cuda.stream(stream):
            for _ in range(self.WARMUP_STEPS):
                self._step_in_place()
                self._undo_step()
        torch.cuda.current_stream(self.tokens_R.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=stream):  # records the kernels without running them
            self._step_in_place()


CUDA_GRAPHS_VARIABLE = "POSTTRAIN_CUDA_GRAPHS"


class CudaGraphsChoiceError(ValueError):
    """POSTTRAIN_CUDA_GRAPHS is neither 0 nor 1."""


def cuda_graphs_enabled() -> bool:
    """Whether CUDA models decode through `GraphedDecoder`'s captured step: POSTTRAIN_CUDA_GRAPHS=1. Off by default
    until the capture has been measured on a GPU (issue #7). Any value other than 0 or 1 raises
    CudaGraphsChoiceError; every run checks it first (`trainers.lifecycle.Lifecycle`, evaluation), so a misspelt
    value stops a CPU run too, where nothing decodes through a graph."""
    value = os.environ.get(CUDA_GRAPHS_VARIABLE, "0")
    if value not in ("0", "1"):
        allowed = "allowed 0 (eager decode steps) or 1 (CUDA graphs)"
        raise CudaGraphsChoiceError(f"{CUDA_GRAPHS_VARIABLE}={value!r}: {allowed}")
    return value == "1"


def build_decoder(model: Any, max_new_tokens: int) -> Decoder:
    """The static-cache fast path where it reproduces the model (its decode step a CUDA graph on a GPU when
    POSTTRAIN_CUDA_GRAPHS=1), else the model's own forward."""
    if not supports_static(model):
        return HFCacheDecoder(model)
    if model.device.type == "cuda" and cuda_graphs_enabled():
        return GraphedDecoder(model, max_new_tokens, capture=True)
    return StaticCacheDecoder(model, max_new_tokens)
