"""The native engine's two ways to run a causal LM incrementally: prefill, expand, select rows, decode.

`HFCacheDecoder` works with any Hugging Face causal LM: it calls the model's own forward with a
`DynamicCache`. `StaticCacheDecoder` is the fast path for the Llama family (Llama, Qwen2 with full
attention): it runs the same weights through a compact forward over a KV cache preallocated for the
whole generation (prompt width + max_new_tokens), so a decode step is a few matmuls per layer with no
per-step mask building, cache concatenation or module dispatch. It reads the model's own modules
(embeddings, norms, activation, rotary tables, Linear layers plain or LoRA-wrapped), looked up once per
generation (`llama_forward.LayerOps`; a decoder lives for one generation), so it follows the weights as
they train; the layer maths it shares with the unpadded training forward lives
in `posttrain.policies.llama_forward`. A small float32 model on CPU decodes through `PackedLayer`s instead:
see there.
tests/rollout/test_decoders.py holds its logits equal to the model's forward, prompts left-padded and
rows leaving the batch.

`GraphedDecoder` is the same decoder with one shape and one set of buffers for every decode step, so that
on a GPU the step is captured once as a CUDA graph and replayed (POSTTRAIN_CUDA_GRAPHS=1; off by default
until measured on a GPU, issue #7). On CPU its step runs eagerly and is tested equal to `StaticCacheDecoder`'s.

Both keep rows left-aligned to one prompt width: row a's token at decode step s sits in cache slot
`width + s`, padding slots are masked out, and positions count real tokens only
(`positions_from_mask`), so a padded prompt sees what it would see alone.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache

from posttrain.policies.llama_forward import (
    RMS_NORMS,
    SILUS,
    base_model,
    decoder_of,
    has_hooks,
    has_llama_layers,
    layer_ops,
    linear_op,
    norm_op,
    rotate,
    signed_half,
)


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


POSITION_DEPENDENT_ROPE = frozenset({"dynamic", "longrope"})
"""RoPE types whose frequencies transformers chooses from the largest position a forward is given
(`dynamic_rope_update`): the static decoder's one table over every slot of the generation would pick them from
prompt width + max_new_tokens, not from the positions the model's forward sees at each step."""


def supports_static(model: Any) -> bool:
    """Whether `StaticCacheDecoder` reproduces this model's forward: Llama family, full attention only, RoPE
    frequencies that do not depend on the positions seen (`POSITION_DEPENDENT_ROPE`), and no forward hooks (it
    would not run them)."""
    if not has_llama_layers(model) or has_hooks(model):
        return False
    return getattr(decoder_of(model).rotary_emb, "rope_type", "default") not in POSITION_DEPENDENT_ROPE


def _decode_attention(q_A_N_1_D: Tensor, k_A_G_K_D: Tensor, v_A_G_K_D: Tensor, bias_AG_1_K: Tensor,
                      scale: float) -> Tensor:  # fmt: skip
    """One query per row over K cached keys, grouped-query heads (N = G x r), as two batched matmuls with
    the padding mask as an additive bias (0 or -inf, [A*G, 1, K], the same for all layers).

    For a single query, plain batched matmuls beat the fused CPU attention kernel, whose per-call setup is
    larger than the work. Returns [A, N, 1, D]."""
    rows, heads, _, dim = q_A_N_1_D.shape
    groups, keys = k_A_G_K_D.shape[1], k_A_G_K_D.shape[2]
    q_AG_R_D = q_A_N_1_D.reshape(rows * groups, heads // groups, dim)
    k_AG_K_D = k_A_G_K_D.reshape(rows * groups, keys, dim)
    scores_AG_R_K = torch.baddbmm(bias_AG_1_K, q_AG_R_D, k_AG_K_D.transpose(1, 2), alpha=scale)
    out_AG_R_D = torch.bmm(scores_AG_R_K.softmax(dim=-1), v_A_G_K_D.reshape(rows * groups, keys, dim))
    return out_AG_R_D.view(rows, heads, 1, dim)


def slots_from(start: int) -> Callable[[Tensor, Tensor], Tensor]:
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
    every later slot is written before a step reads it. With the demo's SFT model, whose answers end at
    different lengths, the 8 selections of a generation took 9% of its time when each made a new cache (most of
    it the first touch of new memory). [R, G, K, D]"""
    cache_A_G_K_D[: len(keep_R), :, :written] = cache_A_G_K_D[:, :, :written].index_select(0, keep_R)
    return cache_A_G_K_D[: len(keep_R)]


PACK_MAX_VALUES = 1 << 22
"""`PackedLayer`s are made for a float32 CPU model whose layer and head weights hold at most this many values (16
MB of copies): its decode step is bound by per-op overhead. Measured on 2 Xeon cores, torch 2.13, 8 prompts x 8
samples x 32 tokens, packed and unpacked alternating in one process (`python bench/packed_decode.py`): the demo
model (0.8M weights) generates 7-14% faster packed over six runs (80 -> 71 ms in one); the 30m model (25M) 3%,
for 100 MB of copies, which would lift its generation's peak memory above transformers `generate`'s."""


@dataclass(frozen=True)
class PackedLayer:
    """One decoder layer's weights packed for a decode step of a small model on CPU, where the step's time is
    the number of ops (each some microseconds) more than their arithmetic:

    - q, k and v are one product (their weights stacked), and so are gate and up;
    - each RMSNorm is moved past the products that read it, which are linear: with x_hat = x r w, where
      r = (mean(x^2) + eps)^-1/2, x_hat W = (x W') r', with W' = diag(w) W sqrt(H) made once and
      r' = (|x|^2 + H eps)^-1/2 one dot product per row, applied to the product's output with its bias
      (`_normed_product`); the final norm likewise into the LM head;
    - o and down add into the residual stream inside their product (addmm), when they have no bias;
    - q and k, adjacent in the stacked output, are rotated together.

    Made from the model's weights at the start of a generation (`packed_layers`), in which they do not change;
    the weights are held transposed, [in, out] (views of [out, in] tensors). Equal to the unpacked step up to
    float rounding: tests/rollout/test_decoders.py."""

    qkv_weight: Tensor
    qkv_bias: Tensor | None
    o_weight: Tensor
    o_bias: Tensor | None
    gate_up_weight: Tensor
    gate_up_bias: Tensor | None
    down_weight: Tensor
    down_bias: Tensor | None
    input_offset: float
    post_offset: float
    scaling: float


@torch.no_grad()
def packed_layers(model: Any, layers: list[torch.nn.Module]) -> list[PackedLayer] | None:
    """The model's layers as `PackedLayer`s, or None where packing does not apply: off the CPU, not float32, a
    layer with other than plain Linear projections (LoRA), RMSNorm and SiLU, or weights over PACK_MAX_VALUES."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.weight.device.type != "cpu" or head.weight.dtype != torch.float32:
        return None
    values = sum(m.weight.numel() for layer in layers for m in layer.modules() if type(m) is torch.nn.Linear)
    if values + head.weight.numel() > PACK_MAX_VALUES or not all(_packable(layer) for layer in layers):
        return None
    return [_pack(layer) for layer in layers]


def _packable(layer: torch.nn.Module) -> bool:
    attn, mlp = layer.self_attn, layer.mlp
    linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    return (
        all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 for m in linears)
        and all(type(n).__name__ in RMS_NORMS for n in norms)
        and type(mlp.act_fn).__name__ in SILUS
    )


def _pack(layer: torch.nn.Module) -> PackedLayer:
    attn, mlp = layer.self_attn, layer.mlp
    input_norm, post_norm = layer.input_layernorm, layer.post_attention_layernorm
    qkv, gate_up = (attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)
    return PackedLayer(
        normed_weight(torch.cat([m.weight for m in qkv]), input_norm), _stacked_bias(qkv),
        attn.o_proj.weight.T, attn.o_proj.bias,
        normed_weight(torch.cat([m.weight for m in gate_up]), post_norm), _stacked_bias(gate_up),
        mlp.down_proj.weight.T, mlp.down_proj.bias,
        norm_offset(input_norm), norm_offset(post_norm), attn.scaling,
    )  # fmt: skip


def normed_weight(weight_N_H: Tensor, norm: torch.nn.Module) -> Tensor:
    """W' = diag(w) W sqrt(H) of the product that reads an RMSNorm (weight w) of H features, transposed. [H, N]"""
    return (weight_N_H * (norm.weight * norm.weight.shape[0] ** 0.5)).T


def norm_offset(norm: torch.nn.Module) -> float:
    """H eps of an RMSNorm of H features: r' = (|x|^2 + H eps)^-1/2 = r / sqrt(H)."""
    return norm.weight.shape[0] * norm.variance_epsilon


def _stacked_bias(linears: tuple[torch.nn.Linear, ...]) -> Tensor | None:
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
    """Llama-family decoding over a preallocated KV cache; see the module docstring.

    Cache tensors are [A, kv_heads, slots, head_dim] per layer with slots = prompt width + max_new_tokens;
    `bias_A_G_1_K` is 0 at slots holding real tokens and -inf at the prompt's padding, built once in the
    prefill (a decoded slot is always real, and a step reads only the slots written so far).
    """

    def __init__(self, model: Any, max_new_tokens: int) -> None:
        self.model = base_model(model)
        self.body = self.model.get_decoder()
        self.head = self.model.get_output_embeddings()
        # the layers' maths looked up once for the whole generation (`LayerOps`), in which the weights do not change
        self.layers = [layer_ops(layer) for layer in self.body.layers]
        self.final_norm, self.lm_head = norm_op(self.body.norm), linear_op(self.head)
        self.packed = packed_layers(self.model, list(self.body.layers))
        if self.packed is not None:
            with torch.no_grad():
                self.packed_head_weight = normed_weight(self.head.weight, self.body.norm)
            self.packed_head_offset = norm_offset(self.body.norm)
        config = self.model.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.max_new_tokens = max_new_tokens

    def prefill(self, input_ids_P_T: Tensor, attention_mask_P_T: Tensor) -> Tensor:
        num_prompts, width = input_ids_P_T.shape
        slots = width + self.max_new_tokens
        weight = self.head.weight
        shape = (num_prompts, self.num_kv_heads, slots, self.head_dim)
        self.keys = [weight.new_zeros(shape) for _ in self.layers]
        self.values = [weight.new_zeros(shape) for _ in self.layers]
        positions = torch.arange(slots, device=weight.device)[None]
        cos_1_K_D, sin_1_K_D = self.body.rotary_emb(weight.new_zeros(1), positions)
        self.cos_K_D, self.signed_sin_K_D = cos_1_K_D[0], signed_half(sin_1_K_D[0])
        real_P_T = attention_mask_P_T.bool()
        self.bias_A_G_1_K = weight.new_zeros(num_prompts, self.num_kv_heads, 1, slots, dtype=self.cos_K_D.dtype)
        self.bias_A_G_1_K[..., :width].masked_fill_(~real_P_T[:, None, None], float("-inf"))
        self.slot = width
        # causal and not padding; a padding query may see itself so that no softmax row is empty
        causal_T_T = torch.ones(width, width, dtype=torch.bool, device=weight.device).tril()
        mask_P_1_T_T = (causal_T_T & real_P_T[:, None, :]) | torch.eye(width, dtype=torch.bool, device=weight.device)
        positions_P_T = positions_from_mask(attention_mask_P_T)
        self.positions_A = real_P_T.sum(dim=-1)
        return self._forward(input_ids_P_T, positions_P_T, mask_P_1_T_T[:, None], slots_from(0))

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
        logits_A_V = self._forward(tokens_A[:, None], self.positions_A[:, None], bias_AG_1_K, slots_from(self.slot))
        self.slot += 1
        self.positions_A = self.positions_A + 1
        return logits_A_V

    def _forward(
        self, ids_A_S: Tensor, positions_A_S: Tensor, mask: Tensor, store: Callable[[Tensor, Tensor], Tensor]
    ) -> Tensor:
        """S new tokens per row, attending to the cache slots `store` returns where `mask` allows: a boolean
        [A, 1, S, K] for a prefill, an additive bias [A * kv_heads, 1, K] for one decoded token. Returns the last
        new position's logits_A_V (float32).

        `store(cache, new)` writes a layer's new keys or values into its cache and returns the slots to attend
        to: `slots_from(start)` here, a slot held in a tensor and all slots in `GraphedDecoder`."""
        rows, new = ids_A_S.shape
        decoding = mask.dtype != torch.bool  # a prefill's mask is boolean, also over prompts of one token
        if decoding and self.packed is not None:
            return self._packed_step(ids_A_S[:, 0], positions_A_S[:, 0], mask, store)
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        cos_A_1_S_D = self.cos_K_D[positions_A_S][:, None]
        signed_sin_A_1_S_D = self.signed_sin_K_D[positions_A_S][:, None]
        x_A_S_H = self.body.embed_tokens(ids_A_S)
        for ops, keys, values in zip(self.layers, self.keys, self.values):
            h_A_S_H = ops.input_norm(x_A_S_H)
            q_A_N_S_D = ops.q_proj(h_A_S_H).view(rows, new, heads, dim).transpose(1, 2)
            k_A_G_S_D = ops.k_proj(h_A_S_H).view(rows, new, kv_heads, dim).transpose(1, 2)
            keys_A_G_K_D = store(keys, rotate(k_A_G_S_D, cos_A_1_S_D, signed_sin_A_1_S_D))
            v_A_G_S_D = ops.v_proj(h_A_S_H).view(rows, new, kv_heads, dim).transpose(1, 2)
            values_A_G_K_D = store(values, v_A_G_S_D)
            q_A_N_S_D = rotate(q_A_N_S_D, cos_A_1_S_D, signed_sin_A_1_S_D)
            if decoding:
                o_A_N_S_D = _decode_attention(q_A_N_S_D, keys_A_G_K_D, values_A_G_K_D, mask, ops.scaling)
            else:
                o_A_N_S_D = F.scaled_dot_product_attention(
                    q_A_N_S_D, keys_A_G_K_D, values_A_G_K_D, attn_mask=mask, scale=ops.scaling,
                    enable_gqa=heads != kv_heads,
                )  # fmt: skip
            o_A_S_H = ops.o_proj(o_A_N_S_D.transpose(1, 2).reshape(rows, new, heads * dim))
            x_A_S_H = ops.mlp_residual(x_A_S_H + o_A_S_H)
        return self.lm_head(self.final_norm(x_A_S_H[:, -1])).float()

    def _packed_step(
        self, ids_A: Tensor, positions_A: Tensor, bias_AG_1_K: Tensor, store: Callable[[Tensor, Tensor], Tensor]
    ) -> Tensor:
        """`_forward` of one token per row through the `PackedLayer`s, on [A, H] hidden states."""
        rows, heads, kv_heads, dim = len(ids_A), self.num_heads, self.num_kv_heads, self.head_dim
        cos_A_1_D, signed_sin_A_1_D = self.cos_K_D[positions_A][:, None], self.signed_sin_K_D[positions_A][:, None]
        x_A_H = self.body.embed_tokens(ids_A)
        for layer, keys, values in zip(self.packed, self.keys, self.values):
            r_A_1 = _inverse_norm(x_A_H, layer.input_offset)
            qkv_A_X = _normed_product(x_A_H, r_A_1, layer.qkv_weight, layer.qkv_bias)
            qk_A_NG_D = rotate(qkv_A_X[:, : (heads + kv_heads) * dim].view(rows, -1, dim), cos_A_1_D, signed_sin_A_1_D)
            keys_A_G_K_D = store(keys, qk_A_NG_D[:, heads:, None])
            values_A_G_K_D = store(values, qkv_A_X[:, (heads + kv_heads) * dim :].view(rows, kv_heads, 1, dim))
            o_A_N_1_D = _decode_attention(qk_A_NG_D[:, :heads, None], keys_A_G_K_D, values_A_G_K_D, bias_AG_1_K,
                                          layer.scaling)  # fmt: skip
            x_A_H = _add_product(x_A_H, o_A_N_1_D.view(rows, heads * dim), layer.o_weight, layer.o_bias)
            r_A_1 = _inverse_norm(x_A_H, layer.post_offset)
            gate_A_I, up_A_I = _normed_product(x_A_H, r_A_1, layer.gate_up_weight, layer.gate_up_bias).chunk(2, dim=-1)
            x_A_H = _add_product(x_A_H, F.silu(gate_A_I) * up_A_I, layer.down_weight, layer.down_bias)
        r_A_1 = _inverse_norm(x_A_H, self.packed_head_offset)
        return _normed_product(x_A_H, r_A_1, self.packed_head_weight, self.head.bias)


class GraphedDecoder:
    """The static-cache decoder with one shape and one set of buffers for every decode step, so that on a GPU
    the step is recorded once as a CUDA graph and replayed with one launch.

    A decode step of a model of up to a few billion parameters is launch-bound on a GPU (issue #7: transformers'
    `generate` reached about 1% of the weight-read bandwidth limit of an H100 for a 0.5B model at batch 64;
    each layer launches some 40 kernels). A graph needs the same shapes and addresses at every replay, so here:

    - every row stays in the batch to the end; `select` only changes which rows' logits `step` returns, and a
      finished row's last token is fed again (on a GPU a step reads all the weights whatever the batch, so
      dropping rows would save little);
    - attention reads every cache slot, the slots not written yet masked out by an additive bias that each
      step opens at its slot;
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
        logits_R_V = self.inner._forward(tokens_R_1, positions_R_1, self.bias_RG_1_K, self._store)
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
