"""Distillation objectives: a student trained towards a teacher's next-token distributions.

`gkd` compares whole distributions, the generalised Jensen-Shannon divergence of GKD, computed over vocabulary
chunks from the two models' final hidden states and output heads, so that neither model's [N, V] logits exist at
once (two passes over the vocabulary: the log-normalisers, then the divergence; the backward recomputes each chunk).
`generalized_jsd` is the same divergence from whole logits, the plain form the chunked one is tested against.
`reverse_kl` is on-policy distillation from the sampled tokens' log-probs only.

Every loss returns one value per token [N]; the loop divides the step's sum by its token count.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain.objectives.registry import distillation_loss

DEFAULT_VOCAB_CHUNK = 8192


def _check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"distillation loss 'gkd': beta={beta}; it interpolates between the two KLs and must be in "
                         "[0, 1]")  # fmt: skip


def generalized_jsd(student_logits_N_V: Tensor, teacher_logits_N_V: Tensor, *, beta: float = 0.5,
                    temperature: float = 1.0) -> Tensor:  # fmt: skip
    """The generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2023, arXiv:2306.13649, Eq. 1), from whole
    logits: the plain form of `gkd` (small vocabularies, tests).

        P = softmax(teacher / tau), Q = softmax(student / tau), M = beta P + (1 - beta) Q
        JSD(beta) = beta KL(P || M) + (1 - beta) KL(Q || M)          0 < beta < 1
        beta = 0: KL(P || Q) (forward KL);   beta = 1: KL(Q || P) (reverse KL)

    Returns [N]. The endpoints are TRL's GKDTrainer.generalized_jsd_loss (trl==1.16), where JSD(beta) itself would
    vanish at both; its mixture is (1 - beta) Q + beta P as here.
    """
    _check_beta(beta)
    log_q = F.log_softmax(student_logits_N_V.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits_N_V.float() / temperature, dim=-1)
    if beta == 0.0:
        return (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    if beta == 1.0:
        return (log_q.exp() * (log_q - log_p)).sum(dim=-1)
    log_m = torch.logaddexp(log_q + math.log1p(-beta), log_p + math.log(beta))
    kl_p = (log_p.exp() * (log_p - log_m)).sum(dim=-1)
    kl_q = (log_q.exp() * (log_q - log_m)).sum(dim=-1)
    return beta * kl_p + (1 - beta) * kl_q


class _ChunkedJSD(torch.autograd.Function):
    """JSD(beta) between softmax(z_t) and softmax(z_s), z = (h W^T + b) / tau, over vocabulary chunks.

    Gradients, with q = softmax(z_s), p = softmax(z_t), m = beta p + (1 - beta) q:
        0 < beta < 1:  dJSD/dz_s = (1 - beta) q (log q - log m - KL(q || m))
        beta = 0:      dKL(p || q)/dz_s = q - p
        beta = 1:      dKL(q || p)/dz_s = q (log q - log p - KL(q || p))
    and dz_s / dlogit = 1 / tau. The teacher gets no gradient.
    """

    @staticmethod
    def forward(ctx: Any, h_s: Tensor, w_s: Tensor, b_s: Tensor | None, h_t: Tensor, w_t: Tensor,
                b_t: Tensor | None, beta: float, inv_tau: float, chunk: int) -> Tensor:  # fmt: skip
        """GKD's generalised JSD (Agarwal et al. 2024, arXiv:2306.13649, Eq. 1) per token, the logits of both models
        formed `chunk` vocabulary rows at a time from their hidden states and heads, never [N, V] whole."""
        vocab = w_s.shape[0]
        lse_s, lse_t = _logsumexp(h_s, w_s, b_s, inv_tau, chunk), _logsumexp(h_t, w_t, b_t, inv_tau, chunk)
        loss = h_s.new_zeros(h_s.shape[0], dtype=torch.float32)
        kl_q_m = torch.zeros_like(loss)  # KL(q || m), or KL(q || p) at beta = 1: the backward's E_q term
        for start in range(0, vocab, chunk):
            log_q = _logits(h_s, w_s, b_s, start, chunk, inv_tau) - lse_s[:, None]
            log_p = _logits(h_t, w_t, b_t, start, chunk, inv_tau) - lse_t[:, None]
            part, q_part = _divergence_parts(log_q, log_p, beta)
            loss += part
            kl_q_m += q_part
        ctx.save_for_backward(h_s, w_s, b_s, h_t, w_t, b_t, lse_s, lse_t, kl_q_m)
        ctx.beta, ctx.inv_tau, ctx.chunk = beta, inv_tau, chunk
        return loss

    @staticmethod
    def backward(ctx: Any, grad_N: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        """The gradient of the generalised JSD (arXiv:2306.13649) in the student's hidden states and head, chunk by
        chunk over the vocabulary like the forward."""
        h_s, w_s, b_s, h_t, w_t, b_t, lse_s, lse_t, kl_q_m = ctx.saved_tensors
        beta, inv_tau, chunk = ctx.beta, ctx.inv_tau, ctx.chunk
        grad_h = torch.zeros_like(h_s, dtype=torch.float32)
        grad_w = torch.zeros_like(w_s, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros_like(b_s, dtype=torch.float32) if b_s is not None and ctx.needs_input_grad[2] else None
        for start in range(0, w_s.shape[0], chunk):
            log_q = _logits(h_s, w_s, b_s, start, chunk, inv_tau) - lse_s[:, None]
            log_p = _logits(h_t, w_t, b_t, start, chunk, inv_tau) - lse_t[:, None]
            q = log_q.exp()
            if beta == 0.0:
                dz = q - log_p.exp()
            elif beta == 1.0:
                dz = q * (log_q - log_p - kl_q_m[:, None])
            else:
                log_m = torch.logaddexp(log_q + math.log1p(-beta), log_p + math.log(beta))
                dz = (1 - beta) * q * (log_q - log_m - kl_q_m[:, None])
            dlogits = (dz * (grad_N[:, None] * inv_tau)).to(w_s.dtype)
            w_chunk = w_s[start : start + chunk]
            grad_h += (dlogits @ w_chunk).float()
            if grad_w is not None:
                grad_w[start : start + chunk] = (dlogits.T @ h_s).float()
            if grad_b is not None:
                grad_b[start : start + chunk] = dlogits.float().sum(dim=0)
        return (grad_h.to(h_s.dtype), None if grad_w is None else grad_w.to(w_s.dtype),
                None if grad_b is None else grad_b.to(b_s.dtype), None, None, None, None, None, None)  # fmt: skip


def _logits(h: Tensor, w: Tensor, b: Tensor | None, start: int, chunk: int, inv_tau: float) -> Tensor:
    """float32 (h W^T + b) / tau of vocabulary rows start .. start + chunk. [N, C]."""
    z = (h @ w[start : start + chunk].T).float()
    if b is not None:
        z = z + b[start : start + chunk].float()
    return z * inv_tau if inv_tau != 1.0 else z


def _logsumexp(h: Tensor, w: Tensor, b: Tensor | None, inv_tau: float, chunk: int) -> Tensor:
    """log sum_v exp(z_v) over the whole vocabulary, one chunk at a time (an online log-sum-exp). [N]."""
    total = h.new_full((h.shape[0],), float("-inf"), dtype=torch.float32)
    for start in range(0, w.shape[0], chunk):
        total = torch.logaddexp(total, torch.logsumexp(_logits(h, w, b, start, chunk, inv_tau), dim=1))
    return total


def _divergence_parts(log_q: Tensor, log_p: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """One chunk's part of the divergence [N], and of KL(q || m) (KL(q || p) at beta = 1) [N]."""
    if beta == 0.0:
        return (log_p.exp() * (log_p - log_q)).sum(dim=1), torch.zeros_like(log_q[:, 0])
    if beta == 1.0:
        part = (log_q.exp() * (log_q - log_p)).sum(dim=1)
        return part, part
    log_m = torch.logaddexp(log_q + math.log1p(-beta), log_p + math.log(beta))
    kl_p = (log_p.exp() * (log_p - log_m)).sum(dim=1)
    kl_q = (log_q.exp() * (log_q - log_m)).sum(dim=1)
    return beta * kl_p + (1 - beta) * kl_q, kl_q


@distillation_loss("gkd")
def gkd(
    student_hidden_N_H: Tensor,
    student_head_V_H: Tensor,
    teacher_hidden_N_H: Tensor,
    teacher_head_V_H: Tensor,
    *,
    student_bias_V: Tensor | None = None,
    teacher_bias_V: Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk: int = DEFAULT_VOCAB_CHUNK,
) -> Tensor:
    """Generalised knowledge distillation (Agarwal et al. 2023, arXiv:2306.13649, Eq. 1 and Algorithm 1): the
    generalised JSD between the teacher's and the student's next-token distributions at every target token.

        P = softmax((h_t W_t^T + b_t) / tau), Q = softmax((h_s W_s^T + b_s) / tau), M = beta P + (1 - beta) Q
        loss_n = beta KL(P || M) + (1 - beta) KL(Q || M);   beta = 0: KL(P || Q);   beta = 1: KL(Q || P)

    The sequences are the dataset's, or with probability lambda the student's own samples (on-policy; the loop's
    `distill.lmbda`), or the teacher's (`distill.seq_kd`). student_hidden_N_H: [N, H] the student's final hidden
    states at the N positions that predict a target token; student_head_V_H: [V, H] its output head; the teacher's
    likewise ([N, H'], [V, H']). Computed over vocabulary chunks of `chunk` rows (`_ChunkedJSD`), equal to
    `generalized_jsd` of the whole logits. Returns [N].
    Defaults: beta = 0.5 and tau = 1 as TRL's GKDConfig and GKDTrainer (trl==1.16); the paper sweeps beta in
    {0.1, 0.5, 0.9}. Deviations from the paper: beta = 0 and 1 are the forward and reverse KLs (TRL's endpoints).
    """
    _check_beta(beta)
    if student_head_V_H.shape[0] != teacher_head_V_H.shape[0]:
        raise ValueError(f"distillation loss 'gkd': the student's head has {student_head_V_H.shape[0]} rows and the "
                         f"teacher's {teacher_head_V_H.shape[0]}; the two must cover one vocabulary")  # fmt: skip
    return _ChunkedJSD.apply(student_hidden_N_H, student_head_V_H, student_bias_V, teacher_hidden_N_H.detach(),
                             teacher_head_V_H.detach(), None if teacher_bias_V is None else teacher_bias_V.detach(),
                             beta, 1.0 / temperature, chunk)  # fmt: skip


@distillation_loss("reverse_kl", on_policy=True)
def reverse_kl(logp_N: Tensor, teacher_logp_N: Tensor) -> Tensor:
    """On-policy distillation by per-token reverse KL on the student's own samples (Agarwal et al. 2023,
    arXiv:2306.13649, the on-policy reverse-KL case; Gu et al. 2023, MiniLLM, arXiv:2306.08543; Lu and Thinking
    Machines Lab 2025, "On-Policy Distillation", whose per-token advantage is -(log pi - log pi_teacher)).

        k_n = log pi(y_n | y_<n) - log pi_teacher(y_n | y_<n)        the sampled-token estimate of KL(pi || teacher)
        loss_n = k_n,   with gradient  sg(k_n) * grad log pi(y_n | y_<n)   (the score-function gradient)

    On the student's samples this is an unbiased estimate of the reverse KL and of its gradient (the expectation of
    grad log pi vanishes); the teacher is read at the sampled tokens only, no distribution over the vocabulary.
    logp_N, teacher_logp_N: [N] log-probs of the sampled tokens. Returns [N].
    Deviations: one update per sample, so the importance ratio to the sampler is 1 and left out (the blog's
    importance-sampling loss equals this at ratio 1); no discount (the blog's discount factor 0).
    """
    k_N = (logp_N - teacher_logp_N.detach()).detach()
    return k_N + k_N * (logp_N - logp_N.detach())
