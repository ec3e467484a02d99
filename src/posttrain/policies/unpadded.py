"""The training forward on real tokens only (issue #7: no compute on padding), through the shared layer forward
(`policies/decoder_layer.py`) of any family with an adapter (`policies/families/`).

Embeddings, norms, projections and the MLP run on the N real tokens as one [N, H] matrix. For attention each
document (a row, or one of the documents packed in a row) is scattered left-aligned into its own row of a
[S, heads, Tmax, D] layout, so a causal mask (with the layer's sliding window, if any) is the whole mask: the
padding after a document's tokens is later than all of them. Rotary tables come from the model's own rotary
module at the positions its forward would use. tests/policies/test_families.py and test_unpadded_forward.py hold
log-probs, entropies and gradients equal to the model's forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from posttrain.policies import cpu_matmul
from posttrain.policies.decoder_layer import LayerOps, Rotary, layer_forward, layer_ops, norm_op, rotary_tables
from posttrain.policies.families import decoder_of, family_of, training_refusal
from posttrain.policies.kernels import causal_attention

MIN_SHARED_FRACTION = 0.1
"""Repeated tokens are computed once only when they are at least this share of the real tokens: copying keys and
values into every document costs a few percent of a forward + backward (bench/RESULTS.md, "Kernels")."""


def runs_unpadded(model: Any) -> bool:
    """Whether `unpadded_hidden_states` reproduces the model's training forward (`families.training_refusal`: a
    family with an adapter, eager or SDPA attention, no dropout while training, no activation checkpointing, no
    forward hooks)."""
    return training_refusal(model) is None


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
    body, family = decoder_of(model), family_of(model)
    config = body.config
    width = input_ids_B_T.shape[1]
    x_U_H = body.embed_tokens(input_ids_B_T.flatten()[docs.token_U])
    positions = torch.arange(width, device=input_ids_B_T.device)[None] if position_ids_B_T is None else position_ids_B_T
    layers = body.layers[: config.num_hidden_layers]
    pad = products_pad_rows(getattr(layers[0].self_attn, family.qkv[0]), x_U_H)
    x_R_H = cpu_matmul.padded_rows(x_U_H) if pad else x_U_H
    computed = len(docs.token_U)
    # one row of angles shared by every batch row, or one per row: index it without expanding to [B * T, D]
    ropes = {}
    for key, (cos_P_T_D, sin_P_T_D) in rotary_tables(body, family, x_U_H, positions).items():
        at_U = docs.token_U % width if cos_P_T_D.shape[0] == 1 else docs.token_U
        at_R = padded_index(at_U, len(x_R_H))
        ropes[key] = Rotary(cos_P_T_D.flatten(0, 1)[at_R, None], sin_P_T_D.flatten(0, 1)[at_R, None],
                            family.rope_keeps_dtype)  # fmt: skip
    slot_R, queries, reads_R = padded_index(docs.slot_U, len(x_R_H)), computed, None
    for index, layer in enumerate(layers):
        ops = layer_ops(layer, family, config, index)
        if at_M is not None and index == len(layers) - 1:
            # every layer's keys and values are needed at all tokens, but the last layer's queries, output
            # projection and MLP only where the caller reads (completion tokens: a third of an arithmetic row)
            reads_R = padded_index(at_M, cpu_matmul.padded_count(len(at_M)) if pad else len(at_M))
            slot_R, queries = docs.slot_U[reads_R], len(at_M)
        attend = partial(document_attention, slot_R=slot_R, queries=queries, computed=computed, docs=docs)
        x_R_H = layer_forward(ops, x_R_H, ropes[ops.rope_key], attend, reads_R)
    return norm_op(body.norm, family.norm)(x_R_H)[:queries]


def products_pad_rows(projection: torch.nn.Module, x_U_H: Tensor) -> bool:
    """Whether the layers' products are computed over rows padded to a bucket (`cpu_matmul.rows_best_padded`: on
    oneDNN, which builds a kernel for every row count): the first attention projection is a plain Linear whose
    product with x is."""
    return type(projection) is torch.nn.Linear and cpu_matmul.rows_best_padded(x_U_H, projection.weight)


def padded_index(index_M: Tensor, rows: int) -> Tensor:
    """`index` with its first entry repeated up to `rows` entries: what it selects comes padded with copies of
    its first row. [rows]"""
    if rows == len(index_M):
        return index_M
    return torch.cat([index_M, index_M[:1].expand(rows - len(index_M))])


def document_attention(
    q_R_N_D: Tensor, k_R_K_D: Tensor, v_R_K_D: Tensor, ops: LayerOps, *, slot_R: Tensor, queries: int, computed: int,
    docs: Documents,
) -> Tensor:  # fmt: skip
    """Causal attention (in the layer's sliding window, scores soft-capped if it caps them) of the first `queries`
    rows of q over the earlier tokens of their documents, from the keys and values of the first `computed` rows
    (the computed tokens; later rows pad products, `padded_index`). [R, N * D]: one row per entry of `slot_R`.

    `slot_R`: the slots of the queries (distinct, a subset of `docs.slot_U`), then R - Q more slots, whose
    rows repeat those slots' outputs (padding rows, `padded_index`).

    Each document is left-aligned in its own row of [S, heads, Tmax, D] (zeros after it), so a causal mask is the
    whole mask: no real query sees a slot after its own. A document's repeated tokens take the keys and values of
    the tokens computed for them (`docs.kv_source_N`)."""
    num_docs, max_len = docs.num_docs, docs.max_len

    def padded(x_R_X_D: Tensor, slot_R: Tensor) -> Tensor:
        x_ST_X_D = x_R_X_D.new_zeros(num_docs * max_len, *x_R_X_D.shape[1:]).index_copy(0, slot_R, x_R_X_D)
        return x_ST_X_D.view(num_docs, max_len, *x_R_X_D.shape[1:]).transpose(1, 2)

    k_U_K_D, v_U_K_D = k_R_K_D[:computed], v_R_K_D[:computed]
    if docs.kv_source_N is not None:
        # index_select, whose backward is an index_add_, where an indexed read's is an accumulating index_put (4x
        # faster on CPU, bench/RESULTS.md "Kernels"); the training forward gathers rows with gradients this way
        k_U_K_D, v_U_K_D = (x.index_select(0, docs.kv_source_N) for x in (k_U_K_D, v_U_K_D))  # now [N, K, D]
    q_heads, dim = q_R_N_D.shape[1:]
    q_S_N_T_D, k_S_K_T_D = padded(q_R_N_D[:queries], slot_R[:queries]), padded(k_U_K_D, docs.kv_slot_N)
    o_S_N_T_D = causal_attention(q_S_N_T_D, k_S_K_T_D, padded(v_U_K_D, docs.kv_slot_N), ops.scaling, ops.softcap,
                                 ops.window)  # fmt: skip
    return o_S_N_T_D.transpose(1, 2).reshape(num_docs * max_len, q_heads * dim).index_select(0, slot_R)
