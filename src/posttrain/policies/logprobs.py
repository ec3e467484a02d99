"""Per-token log-probs and entropy of given tokens, computed over vocabulary chunks.

A [B, T, V] float32 log-softmax costs 4*B*T*V bytes (8 x 1024 tokens x 152k vocab = 5 GB) and the same
again for its gradient. Here the language-model head runs chunk by chunk over the vocabulary with an
online log-sum-exp, only at the positions the caller asks for (completion tokens, not the prompt or
padding), and the backward pass recomputes each chunk instead of storing it: memory is O(N * chunk).

The backbone runs on real tokens only for the families with an adapter (`unpadded.py`, `families/`: no compute
on padding); other models run their own forward over the padded batch.

Alignment, used by every caller: `logp_B_T[b, t] = log p(input_ids[b, t] | input_ids[b, :t])`, so a
mask aligned with `input_ids` (True where a token is a target) selects the right values; t = 0 has no
prediction and holds 0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from posttrain.policies import cpu_matmul
from posttrain.policies.decoder_layer import final_softcap
from posttrain.policies.families import decoder_of
from posttrain.policies.unpadded import find_documents, runs_unpadded, unpadded_hidden_states

DEFAULT_VOCAB_CHUNK = 8192


class _ChunkedLogprobEntropy(torch.autograd.Function):
    """log p(target) and entropy of softmax(cap(h @ W.T + b) / tau) without materialising the [N, V] matrix;
    cap(l) = c tanh(l / c) where the model soft-caps its final logits (Gemma 2, arXiv:2408.00118), else l.

    With z = cap(logits) / tau, p = softmax(z), lse = logsumexp(z), E[z] = sum_i p_i z_i:
        logp   = z_target - lse          d logp / d z_i = 1[i = target] - p_i
        H      = lse - E[z]              d H    / d z_i = -p_i (z_i - E[z])
    so with upstream gradients g (of logp) and g_H (of H):
        d / d z_i = g 1[i = target] - p_i (g + g_H (z_i - E[z]))
    and d z_i / d logit_i = (1 - tanh^2(logit_i / c)) / tau.

    Every chunk reuses [N, chunk] float32 buffers and works on them in place: a fresh temporary per elementwise
    op costs more in page faults than the op itself (bench/RESULTS.md, "Kernels").
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden_N_H: Tensor,
        weight_V_H: Tensor,
        bias_V: Tensor | None,
        targets_N: Tensor,
        inv_temperature: float,
        chunk: int,
        softcap: float | None,
    ) -> tuple[Tensor, Tensor]:
        n, vocab = hidden_N_H.shape[0], weight_V_H.shape[0]
        running_max = hidden_N_H.new_full((n,), float("-inf"), dtype=torch.float32)
        sum_exp = hidden_N_H.new_zeros((n,), dtype=torch.float32)
        sum_exp_z = hidden_N_H.new_zeros((n,), dtype=torch.float32)
        target_z = hidden_N_H.new_zeros((n,), dtype=torch.float32)
        z_buffer, e_buffer = _buffers(hidden_N_H, min(chunk, vocab))
        for start in range(0, vocab, chunk):
            z_N_C = _chunk_logits(z_buffer, hidden_N_H, weight_V_H, bias_V, start, chunk, inv_temperature, softcap)
            width = z_N_C.shape[1]
            new_max = torch.maximum(running_max, z_N_C.amax(dim=1))
            rescale = torch.exp(running_max - new_max)
            e_N_C = torch.sub(z_N_C, new_max[:, None], out=_view(e_buffer, n, width)).exp_()
            sum_exp = sum_exp * rescale + e_N_C.sum(dim=1)
            sum_exp_z = sum_exp_z * rescale + torch.einsum("nc,nc->n", e_N_C, z_N_C)
            running_max = new_max
            in_chunk = (targets_N >= start) & (targets_N < start + width)
            local = (targets_N - start).clamp(0, width - 1)
            target_z += torch.where(in_chunk, z_N_C.gather(1, local[:, None]).squeeze(1), 0.0)
        lse = running_max + torch.log(sum_exp)
        mean_z = sum_exp_z / sum_exp
        ctx.save_for_backward(hidden_N_H, weight_V_H, bias_V, targets_N, lse, mean_z)
        ctx.inv_temperature, ctx.chunk, ctx.softcap = inv_temperature, chunk, softcap
        # an output the loss does not use (usually the entropy) arrives as None, not as zeros to multiply
        ctx.set_materialize_grads(False)
        return target_z - lse, lse - mean_z

    @staticmethod
    def backward(ctx: Any, grad_logp_N: Tensor | None, grad_entropy_N: Tensor | None):  # type: ignore[override]
        hidden_N_H, weight_V_H, bias_V, targets_N, lse, mean_z = ctx.saved_tensors
        inv_t, chunk, softcap = ctx.inv_temperature, ctx.chunk, ctx.softcap
        if grad_logp_N is None and grad_entropy_N is None:
            return None, None, None, None, None, None, None
        n, vocab = hidden_N_H.shape[0], weight_V_H.shape[0]
        grad_hidden = torch.zeros_like(hidden_N_H, dtype=torch.float32)
        grad_weight = torch.empty_like(weight_V_H, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        wants_bias = bias_V is not None and ctx.needs_input_grad[2]
        grad_bias = torch.empty_like(bias_V, dtype=torch.float32) if wants_bias else None
        z_buffer, c_buffer = _buffers(hidden_N_H, min(chunk, vocab))
        slope_buffer = None if softcap is None else z_buffer.new_empty(z_buffer.shape)
        for start in range(0, vocab, chunk):
            z_N_C = _chunk_logits(z_buffer, hidden_N_H, weight_V_H, bias_V, start, chunk, inv_t, softcap, slope_buffer)
            width = z_N_C.shape[1]
            coef_N_C = None  # g + g_H (z - E[z]), when the entropy has a gradient
            if grad_entropy_N is not None:
                coef_N_C = torch.sub(z_N_C, mean_z[:, None], out=_view(c_buffer, n, width))
                coef_N_C.mul_(grad_entropy_N[:, None])
                if grad_logp_N is not None:
                    coef_N_C.add_(grad_logp_N[:, None])
            p_N_C = z_N_C.sub_(lse[:, None]).exp_()  # z's buffer now holds p
            if coef_N_C is not None:
                dz_N_C = p_N_C.mul_(coef_N_C).neg_()
            else:
                dz_N_C = p_N_C.mul_(-grad_logp_N[:, None])
            if grad_logp_N is not None:
                in_chunk = (targets_N >= start) & (targets_N < start + width)
                rows = in_chunk.nonzero().squeeze(1)
                dz_N_C[rows, targets_N[rows] - start] += grad_logp_N[rows]
            if inv_t != 1.0:
                dz_N_C.mul_(inv_t)
            if slope_buffer is not None:
                dz_N_C.mul_(_view(slope_buffer, n, width))
            dlogits_N_C = dz_N_C.to(weight_V_H.dtype)
            w_C_H = weight_V_H[start : start + width]
            grad_hidden += cpu_matmul.linear(dlogits_N_C, w_C_H.T).float()  # dlogits @ W
            if grad_weight is not None:
                grad_weight[start : start + width] = cpu_matmul.linear(dlogits_N_C.T, hidden_N_H.T)  # dlogits^T h
            if grad_bias is not None:
                grad_bias[start : start + width] = dlogits_N_C.float().sum(dim=0)
        return (
            grad_hidden.to(hidden_N_H.dtype),
            None if grad_weight is None else grad_weight.to(weight_V_H.dtype),
            None if grad_bias is None else grad_bias.to(bias_V.dtype),
            None,
            None,
            None,
            None,
        )


def _buffers(hidden_N_H: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Two reusable float32 [N, width] work buffers."""
    n = hidden_N_H.shape[0]
    return (hidden_N_H.new_empty((n * width,), dtype=torch.float32) for _ in range(2))  # type: ignore[return-value]


def _view(buffer: Tensor, n: int, width: int) -> Tensor:
    """A contiguous [n, width] view at the start of a flat buffer (the last chunk may be narrower)."""
    return buffer[: n * width].view(n, width)


def _chunk_logits(
    buffer: Tensor,
    hidden_N_H: Tensor,
    weight_V_H: Tensor,
    bias_V: Tensor | None,
    start: int,
    chunk: int,
    inv_temperature: float,
    softcap: float | None = None,
    slope_buffer: Tensor | None = None,
) -> Tensor:
    """float32 cap(logits) / tau of vocabulary rows start .. start + chunk, written into `buffer`. [N, C]. With a
    `slope_buffer`, the cap's derivative 1 - tanh^2(logit / c) goes there too."""
    w_C_H = weight_V_H[start : start + chunk]
    z_N_C = _view(buffer, hidden_N_H.shape[0], w_C_H.shape[0])
    plain_fp32 = hidden_N_H.dtype == w_C_H.dtype == torch.float32
    if plain_fp32 and not torch.is_autocast_enabled(hidden_N_H.device.type):
        cpu_matmul.linear_into(z_N_C, hidden_N_H, w_C_H)
    else:  # lower precision, or autocast choosing it: the matmul in that precision, as everywhere else
        z_N_C.copy_(hidden_N_H @ w_C_H.T)
    if bias_V is not None:
        z_N_C += bias_V[start : start + chunk].float()
    if softcap is not None:
        z_N_C.div_(softcap).tanh_()
        if slope_buffer is not None:
            torch.mul(z_N_C, z_N_C, out=_view(slope_buffer, *z_N_C.shape)).neg_().add_(1.0)
        z_N_C.mul_(softcap)
    if inv_temperature != 1.0:
        z_N_C.mul_(inv_temperature)
    return z_N_C


def gather_logprobs_and_entropy(
    hidden_N_H: Tensor,
    weight_V_H: Tensor,
    targets_N: Tensor,
    *,
    bias_V: Tensor | None = None,
    temperature: float = 1.0,
    chunk: int = DEFAULT_VOCAB_CHUNK,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """log p(target) and entropy, both float32 [N], of softmax(cap(hidden @ weight.T + bias) / temperature), with
    cap(l) = softcap * tanh(l / softcap), or l when `softcap` is None."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    return _ChunkedLogprobEntropy.apply(hidden_N_H, weight_V_H, bias_V, targets_N, 1.0 / temperature, chunk, softcap)


def token_logprobs(
    model: torch.nn.Module,
    input_ids_B_T: Tensor,
    attention_mask_B_T: Tensor | None,
    target_mask_B_T: Tensor,
    *,
    position_ids_B_T: Tensor | None = None,
    temperature: float = 1.0,
    chunk: int = DEFAULT_VOCAB_CHUNK,
) -> tuple[Tensor, Tensor]:
    """Log-probs and entropies [B, T] of `input_ids` under `model`, at the positions of `target_mask`.

    attention_mask_B_T: True (or 1) on real tokens, or None (all real). Right padding (each row real
    tokens, then padding) takes the fast paths; any other mask goes to the model's forward as it is.
    position_ids_B_T: None (0, 1, ... in each row) or each token's position. With right padding or no
    mask, a row whose positions do not step by +1 holds packed documents, each attending to itself only
    (transformers' rule for packed rows, `masking_utils.find_packed_sequence_indices`).

    Only target positions are computed; elsewhere both outputs are 0. See the module docstring for the
    alignment. Models of a family with an adapter run on their real tokens only (`unpadded.py`); the chunked
    head soft-caps logits where the model does (Gemma 2 and 3); a head that scales its logits (`logit_scale`) or is
    not a plain Linear (LoRA on the head) runs as its module over the [N, V] logits.
    """
    predict_B_T = torch.zeros_like(target_mask_B_T, dtype=torch.bool)
    predict_B_T[:, :-1] = target_mask_B_T[:, 1:]  # the hidden state at t predicts token t + 1
    hidden_N_H = hidden_states_at(model, input_ids_B_T, attention_mask_B_T, position_ids_B_T, predict_B_T)
    targets_N = input_ids_B_T[:, 1:][target_mask_B_T[:, 1:]]
    head = model.get_output_embeddings()
    # the chunked head reads the weight itself: a head that is not a plain Linear (one LoRA wraps, whose weight is
    # its frozen base's) runs as its module
    if getattr(model.config, "logit_scale", None) or type(head) is not torch.nn.Linear:
        logp_N, entropy_N = _plain_logprobs_and_entropy(model, hidden_N_H, targets_N, temperature)
    else:
        logp_N, entropy_N = gather_logprobs_and_entropy(
            hidden_N_H,
            head.weight,
            targets_N,
            bias_V=getattr(head, "bias", None),
            temperature=temperature,
            chunk=chunk,
            softcap=final_softcap(model),
        )
    logp_B_T = hidden_N_H.new_zeros(target_mask_B_T.shape, dtype=torch.float32)
    entropy_B_T = torch.zeros_like(logp_B_T)
    target_at_B_T = torch.zeros_like(predict_B_T)
    target_at_B_T[:, 1:] = target_mask_B_T[:, 1:]
    logp_B_T = logp_B_T.masked_scatter(target_at_B_T, logp_N)
    entropy_B_T = entropy_B_T.masked_scatter(target_at_B_T, entropy_N)
    return logp_B_T, entropy_B_T


def hidden_states_at(
    model: torch.nn.Module,
    input_ids_B_T: Tensor,
    attention_mask_B_T: Tensor | None,
    position_ids_B_T: Tensor | None,
    at_B_T: Tensor,
) -> Tensor:
    """Final hidden states [M, H] at the M positions of `at_B_T` (bool [B, T]), in row-major order: from the
    unpadded forward where it reproduces the model, else from its decoder's own forward over the padded batch.

    model: a causal LM (under any peft wrapper) or a bare decoder such as the PPO critic's backbone.
    attention_mask_B_T, position_ids_B_T: as in `token_logprobs`. On the unpadded path the last layer's
    queries, output projection and MLP run at the positions of `at_B_T` only.
    """
    right_padded = attention_mask_B_T is None or is_right_padded(attention_mask_B_T)
    if right_padded and runs_unpadded(model):
        real_B_T = torch.ones_like(at_B_T) if attention_mask_B_T is None else attention_mask_B_T.bool()
        docs = find_documents(input_ids_B_T, real_B_T, position_ids_B_T)
        # a position asked for on padding has no unpadded hidden state (no caller asks; the plain path answers)
        if docs is not None and not (at_B_T & ~real_B_T).any():
            # rows repeating a prefix read its states where they were computed, once (a GRPO group's last prompt
            # token predicts every completion's first token)
            computed_M, read_M = docs.index_BT[at_B_T.flatten()].unique(return_inverse=True)
            hidden_C_H = unpadded_hidden_states(model, input_ids_B_T, position_ids_B_T, docs, computed_M)
            return hidden_C_H.index_select(0, read_M)
    if right_padded:
        # Right padding only: under the causal mask no real token attends to a later position, so the padding
        # is invisible to every real token. Without the mask the model takes its plain causal attention path
        # (no [B, 1, T, T] mask built and applied), or splits packed rows by their position ids: 10-15% less
        # time per forward + backward on CPU (bench/profile_grpo.py). Outputs at padding positions change;
        # they are never targets. tests/policies/test_unpadded_forward.py (gradient checkpointing: this path)
        # holds it equal to the model's forward with the mask, and packed rows equal to transformers' packing.
        attention_mask_B_T = None
    out = decoder_of(model)(
        input_ids=input_ids_B_T,
        attention_mask=attention_mask_B_T,
        position_ids=position_ids_B_T,
        use_cache=False,
    )
    return out.last_hidden_state[at_B_T]


def is_right_padded(attention_mask_B_T: Tensor) -> bool:
    """Every row is real tokens then padding (a prefix of ones), so the mask hides only trailing positions."""
    mask_B_T = attention_mask_B_T.bool()
    return bool((mask_B_T[:, 1:] <= mask_B_T[:, :-1]).all())


def _plain_logprobs_and_entropy(
    model: torch.nn.Module, hidden_N_H: Tensor, targets_N: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    logits_N_V = model.get_output_embeddings()(hidden_N_H).float()
    cap = final_softcap(model)
    if cap:
        logits_N_V = torch.tanh(logits_N_V / cap) * cap
    scale = getattr(model.config, "logit_scale", None)
    if scale:
        logits_N_V = logits_N_V * scale
    logp_N_V = torch.log_softmax(logits_N_V / temperature, dim=-1)
    entropy_N = -(logp_N_V.exp() * logp_N_V).sum(dim=-1)
    return logp_N_V.gather(1, targets_N[:, None]).squeeze(1), entropy_N
