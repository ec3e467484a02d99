"""Policy-gradient surrogate losses, per token.

Each loss is registered with `@policy_loss(name)` and has the signature

    fn(logp_B_T, old_logp_B_T, adv_B_T, mask_B_T, *, <hyper-parameters>) -> (loss_B_T, clipped_B_T)

logp_B_T: [B, T] log-probs of the sampled tokens under the policy being trained (with gradient);
old_logp_B_T: [B, T] the same under the policy that sampled them (no gradient); adv_B_T: [B, T]
advantages (a sequence-level advantage broadcast over its tokens); mask_B_T: [B, T] bool completion mask.

loss_B_T is the per-token loss to *minimise*, zero outside the mask and not reduced: reduction is
`objectives/aggregation.py`'s job. clipped_B_T is 1.0 where the loss's clipping or truncation changed
that token's gradient (the clip-fraction metric), 0.0 elsewhere and outside the mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.objectives.registry import policy_loss

# exp(20) ~ 4.9e8: a log-ratio beyond +-20 means the token is hopelessly off-policy; clamping keeps the
# ratio finite in float32 (verl clamps the log-ratio at the same value).
_LOG_RATIO_LIMIT = 20.0


def _masked(x_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
    return torch.where(mask_B_T, x_B_T, torch.zeros_like(x_B_T))


def _clipped_surrogate(
    ratio_B_T: Tensor, adv_B_T: Tensor, *, clip_low: float, clip_high: float
) -> tuple[Tensor, Tensor]:
    """-min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A) and where the clipped term won."""
    unclipped_B_T = ratio_B_T * adv_B_T
    clipped_B_T = ratio_B_T.clamp(1.0 - clip_low, 1.0 + clip_high) * adv_B_T
    return -torch.minimum(unclipped_B_T, clipped_B_T), clipped_B_T < unclipped_B_T


@policy_loss("ppo")
def ppo(
    logp_B_T: Tensor,
    old_logp_B_T: Tensor,
    adv_B_T: Tensor,
    mask_B_T: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[Tensor, Tensor]:
    """PPO clipped surrogate (Schulman et al. 2017, arXiv:1707.06347, Eq. 7), per token.

        rho_t  = exp(logp_t - old_logp_t)
        loss_t = -min(rho_t * A_t, clip(rho_t, 1 - clip_low, 1 + clip_high) * A_t)
        dual_clip = c > 1, for A_t < 0 only:  loss_t = min(loss_t, -c * A_t)

    clip_low / clip_high are DAPO's decoupled eps_low / eps_high ("clip-higher", Yu et al. 2025,
    arXiv:2503.14476; DAPO uses 0.2 / 0.28); equal values give PPO's single eps (0.2 in the PPO
    paper). dual_clip is Ye et al. 2020 (arXiv:1912.09729; they use c = 3): it bounds the loss of a
    negative-advantage token whose ratio has grown very large. None disables it.

    Shapes: see the module docstring. Returns (loss_B_T, clipped_B_T); clipped marks tokens whose gradient
    the clip (or the dual clip) zeroed.
    Deviations: the log-ratio is clamped to [-20, 20] before exp to keep the ratio finite (as verl).
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"policy loss 'ppo': dual_clip={dual_clip}; it must be > 1 (Ye et al. use 3)")
    log_ratio_B_T = (logp_B_T - old_logp_B_T).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    loss_B_T, clipped_B_T = _clipped_surrogate(
        log_ratio_B_T.exp(), adv_B_T, clip_low=clip_low, clip_high=clip_high
    )
    if dual_clip is not None:
        bound_B_T = -dual_clip * adv_B_T
        dual_B_T = (adv_B_T < 0) & (bound_B_T < loss_B_T)
        loss_B_T = torch.where(dual_B_T, bound_B_T, loss_B_T)
        clipped_B_T = clipped_B_T | dual_B_T
    return _masked(loss_B_T, mask_B_T), _masked(clipped_B_T.to(logp_B_T.dtype), mask_B_T)


@policy_loss("gspo")
def gspo(
    logp_B_T: Tensor,
    old_logp_B_T: Tensor,
    adv_B_T: Tensor,
    mask_B_T: Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
) -> tuple[Tensor, Tensor]:
    """Group sequence policy optimisation, GSPO-token form (Zheng et al. 2025, arXiv:2507.18071).

        s_i      = exp(1/|y_i| * sum_t (logp_t - old_logp_t))          length-normalised sequence ratio
        s_{i,t}  = sg[s_i] * exp(logp_t - sg[logp_t])                   value s_i, gradient s_i * grad logp_t
        loss_t   = -min(s_{i,t} * A_{i,t}, clip(s_{i,t}, 1 - clip_low, 1 + clip_high) * A_{i,t})

    With a sequence-level advantage (A_{i,t} = A_i) and `seq_mean_token_mean` aggregation this has exactly
    GSPO's gradient, A_i * s_i * 1/|y_i| * sum_t grad logp_t, for unclipped sequences.
    Defaults: clip_low = 3e-4, clip_high = 4e-4, the clipping ranges of the paper's experiments.

    Shapes: see the module docstring; the mean over t uses the valid tokens of each row only. Every
    token of a clipped sequence is marked in clipped_B_T.
    Deviations: the mean log-ratio is clamped to [-20, 20] before exp (the value only; gradient unchanged).
    """
    log_ratio_B_T = _masked(logp_B_T.detach() - old_logp_B_T, mask_B_T)
    lengths_B = mask_B_T.sum(dim=1).clamp(min=1)
    log_seq_ratio_B = (log_ratio_B_T.sum(dim=1) / lengths_B).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    ratio_B_T = (log_seq_ratio_B[:, None] + logp_B_T - logp_B_T.detach()).exp()
    loss_B_T, clipped_B_T = _clipped_surrogate(ratio_B_T, adv_B_T, clip_low=clip_low, clip_high=clip_high)
    return _masked(loss_B_T, mask_B_T), _masked(clipped_B_T.to(logp_B_T.dtype), mask_B_T)


@policy_loss("cispo")
def cispo(
    logp_B_T: Tensor,
    old_logp_B_T: Tensor,
    adv_B_T: Tensor,
    mask_B_T: Tensor,
    *,
    clip_low: float | None = None,
    clip_high: float = 4.0,
) -> tuple[Tensor, Tensor]:
    """Clipped IS-weight policy optimisation (MiniMax-M1, MiniMax 2025, arXiv:2506.13585).

        r_t    = exp(logp_t - old_logp_t)
        w_t    = sg[clip(r_t, 1 - clip_low, 1 + clip_high)]
        loss_t = -w_t * A_t * logp_t                 gradient -w_t * A_t * grad logp_t: no token is dropped

    clip_low=None leaves the weight unbounded below, as the paper does in practice (it sets no lower
    bound and tunes only eps_high^IS). We found no value of eps_high^IS in the report; clip_high=4.0 caps
    the weight at 5, the cap ScaleRL recommends (Khatri et al. 2025, arXiv:2510.13786) and TRL's
    recommended `epsilon_high=5.0` for its cispo loss (TRL names the cap itself).

    Shapes: see the module docstring. clipped_B_T marks tokens whose weight was clipped.
    Deviations: none beyond the defaults above; the log-ratio is clamped to [-20, 20] before exp.
    """
    log_ratio_B_T = (logp_B_T.detach() - old_logp_B_T).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    ratio_B_T = log_ratio_B_T.exp()
    low = None if clip_low is None else 1.0 - clip_low
    weight_B_T = ratio_B_T.clamp(min=low, max=1.0 + clip_high)
    loss_B_T = -weight_B_T * adv_B_T * logp_B_T
    clipped_B_T = weight_B_T != ratio_B_T
    return _masked(loss_B_T, mask_B_T), _masked(clipped_B_T.to(logp_B_T.dtype), mask_B_T)


@policy_loss("topr")
def topr(
    logp_B_T: Tensor,
    old_logp_B_T: Tensor,
    adv_B_T: Tensor,
    mask_B_T: Tensor,
    *,
    truncate_high: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Tapered off-policy REINFORCE (Le Roux et al. 2025, arXiv:2503.14286), per token.

        rho_i  = pi(y_i | x) / mu(y_i | x) = exp(sum_t (logp_t - old_logp_t))     whole-sequence ratio
        w_i    = 1                          if A_i >= 0    (positives: plain SFT-like REINFORCE)
               = sg[clip(rho_i, 0, truncate_high)]   if A_i < 0    (negatives: truncated IS)
        loss_t = -w_i * A_i * logp_t

    mu is the sampling (old) policy. truncate_high is the upper truncation of the negatives' ratio (the
    paper's [.]_0^1 uses 1). A_i is read per token, so a token-level advantage also works; the sign test
    then applies per token with the sequence's ratio.

    Shapes: see the module docstring. clipped_B_T marks the tokens of negative sequences whose ratio was
    truncated.
    Deviations: the paper splits on the sign of the reward R(tau) after its baseline shift; we split on
    the sign of the advantage the estimator produced, which is that shifted reward when the estimator is
    r - b (e.g. `reinforce`).
    """
    log_ratio_B_T = _masked(logp_B_T.detach() - old_logp_B_T, mask_B_T)
    log_seq_ratio_B = log_ratio_B_T.sum(dim=1)
    # clamping the log-ratio at log(truncate_high) is exact for the truncation and cannot overflow exp
    limit = torch.as_tensor(truncate_high, dtype=logp_B_T.dtype, device=logp_B_T.device).log()
    truncated_ratio_B = torch.minimum(log_seq_ratio_B, limit).exp()
    negative_B_T = adv_B_T < 0
    weight_B_T = torch.where(negative_B_T, truncated_ratio_B[:, None], torch.ones_like(adv_B_T))
    loss_B_T = -weight_B_T * adv_B_T * logp_B_T
    clipped_B_T = negative_B_T & (log_seq_ratio_B > limit)[:, None]
    return _masked(loss_B_T, mask_B_T), _masked(clipped_B_T.to(logp_B_T.dtype), mask_B_T)


@policy_loss("pg")
def pg(logp_B_T: Tensor, old_logp_B_T: Tensor, adv_B_T: Tensor, mask_B_T: Tensor) -> tuple[Tensor, Tensor]:
    """Plain policy gradient (REINFORCE; Williams 1992, Machine Learning 8:229-256).

        loss_t = -A_t * logp_t

    On-policy only: old_logp_B_T is accepted for the common signature and ignored.
    Shapes: see the module docstring. clipped_B_T is all zeros.
    Deviations: none.
    """
    del old_logp_B_T
    loss_B_T = -adv_B_T * logp_B_T
    return _masked(loss_B_T, mask_B_T), torch.zeros_like(logp_B_T)


def entropy_bonus(entropy_B_T: Tensor, *, coef: float) -> Tensor:
    """Entropy bonus as a per-token loss term (PPO, Schulman et al. 2017, arXiv:1707.06347, Eq. 9).

        loss_t = -coef * H_t          H_t: entropy of the policy's next-token distribution at t

    entropy_B_T: [B, T]. Returns [B, T], to be added to a policy loss before aggregation (minimising it
    raises entropy for coef > 0). Not registered: it is one term, not a choice among alternatives.
    Deviations: none.
    """
    return -coef * entropy_B_T


@policy_loss("gmpo")
def gmpo(
    logp_B_T: Tensor,
    old_logp_B_T: Tensor,
    adv_B_T: Tensor,
    mask_B_T: Tensor,
    *,
    clip_low: float = 0.4,
    clip_high: float = 0.4,
) -> tuple[Tensor, Tensor]:
    """Geometric-mean policy optimisation (Zhao et al. 2025, arXiv:2507.20673): the geometric mean of the
    token-level ratios, clipped token by token in log space, times the sequence's advantage.

        d_t     = logp_t - old_logp_t
        d'_t    = min(d_t, clip(d_t, -clip_low, clip_high))  if A_{i,t} >= 0,  max(d_t, clip(...))  if A_{i,t} < 0
        s_i     = exp(1/|y_i| * sum_t d'_t)                   (the geometric mean of the clipped token ratios)
        A_i     = 1/|y_i| * sum_t A_{i,t}
        loss_t  = -A_i * s_i                                  at every valid token of sequence i

    With `seq_mean_token_mean` aggregation the loss is GMPO's -1/N sum_i A_i * s_i (each sequence's tokens carry the
    same value, whose mean is that value); with another aggregation a sequence weighs by its length. The clip is
    pessimistic as PPO's: for A >= 0 a log-ratio above clip_high stops its token's gradient, one below -clip_low keeps
    it (and the reverse for A < 0). Defaults: clip_low = clip_high = 0.4, the paper's range (e^-0.4, e^0.4), the
    `CLIPRANGE=0.4` of its scripts (github.com/callsys/GMPO, scripts/qwen2.5-math-7b-gmpo.sh).

    Shapes: see the module docstring. clipped_B_T marks the tokens whose log-ratio the clip replaced (where A != 0).
    Deviations: the authors' code (train_zero_math_gmpo.py) takes the sign from the sequence's advantage and treats
    A = 0 as positive, verl's `geo_mean` from each token's advantage: the same for a sequence-level advantage, which
    is what this follows per token. The mean log-ratio is clamped to [-20, 20] before exp (verl and the authors do not
    clamp); an all-padding row gives 0.
    """
    log_ratio_B_T = logp_B_T - old_logp_B_T
    bounded_B_T = log_ratio_B_T.clamp(-clip_low, clip_high)
    pessimistic_B_T = torch.where(
        adv_B_T >= 0, torch.minimum(log_ratio_B_T, bounded_B_T), torch.maximum(log_ratio_B_T, bounded_B_T)
    )
    lengths_B = mask_B_T.sum(dim=1).clamp(min=1)
    mean_log_ratio_B = _masked(pessimistic_B_T, mask_B_T).sum(dim=1) / lengths_B
    seq_ratio_B = mean_log_ratio_B.clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT).exp()
    seq_adv_B = _masked(adv_B_T, mask_B_T).sum(dim=1) / lengths_B
    loss_B_T = (-seq_adv_B * seq_ratio_B)[:, None].expand_as(logp_B_T)
    clipped_B_T = (pessimistic_B_T != log_ratio_B_T) & (adv_B_T != 0)  # as verl's clip fractions: A = 0 moves nothing
    return _masked(loss_B_T, mask_B_T), _masked(clipped_B_T.to(logp_B_T.dtype), mask_B_T)


@policy_loss("sapo")
def sapo(
    logp_B_T: Tensor,
    old_logp_B_T: Tensor,
    adv_B_T: Tensor,
    mask_B_T: Tensor,
    *,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
) -> tuple[Tensor, Tensor]:
    """Soft adaptive policy optimisation (Gao et al. 2025, Qwen, arXiv:2511.20347): a sigmoid gate of the token ratio
    in place of the hard clip, with a steeper gate for negative advantages.

        r_t    = exp(logp_t - old_logp_t)
        tau_t  = tau_pos if A_t > 0 else tau_neg
        f_t    = sigmoid(tau_t * (r_t - 1)) * 4 / tau_t
        loss_t = -f_t * A_t

    The gate's gradient is 4 * sigmoid * (1 - sigmoid) * r_t * grad logp_t: 1 at r = 1 (on policy it is the plain
    policy gradient), decaying smoothly as the ratio leaves 1, faster for larger tau. Defaults tau_pos = 1.0 and
    tau_neg = 1.05 are the paper's (tau_neg > tau_pos damps negative-advantage tokens sooner). The paper aggregates as
    GRPO, `seq_mean_token_mean`.

    Shapes: see the module docstring. clipped_B_T is all zeros: no token's gradient is cut, only attenuated.
    Deviations: none from the paper's formula (verl's `sapo` computes the same); the log-ratio is clamped to [-20, 20]
    before exp, as verl does.
    """
    if tau_pos <= 0 or tau_neg <= 0:
        raise ValueError(f"policy loss 'sapo': tau_pos={tau_pos}, tau_neg={tau_neg}; both must be > 0")
    ratio_B_T = (logp_B_T - old_logp_B_T).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT).exp()
    tau_B_T = torch.where(adv_B_T > 0, tau_pos, tau_neg).to(logp_B_T.dtype)
    gate_B_T = torch.sigmoid(tau_B_T * (ratio_B_T - 1.0)) * 4.0 / tau_B_T
    return _masked(-gate_B_T * adv_B_T, mask_B_T), torch.zeros_like(logp_B_T)


# NFT's clamps of the ratio and of the group accuracy, from the authors' code (github.com/NVlabs/NFT, dp_actor.py)
_NFT_LOG_RATIO_MAX = 10.0
_NFT_RATE_MIN, _NFT_RATE_MAX = 0.02, 0.98
NFT_PROMPT_WEIGHTS = ("none", "negative_rate", "grpo")


def _clamp_keeping_gradient(x: Tensor, *, min: float) -> Tensor:
    """The value of clamp(x, min=min) with the gradient of x (the authors' `clamp_preserve_grad`)."""
    return x + (x.clamp(min=min) - x).detach()


@policy_loss("nft")
def nft(
    logp_B_T: Tensor,
    old_logp_B_T: Tensor,
    adv_B_T: Tensor,
    mask_B_T: Tensor,
    rewards_B: Tensor,
    group_mean_rewards_B: Tensor,
    *,
    neg_weight: float = 1.0,
    clamp_negative: float = 1.0,
    clamp_positive: float = 0.0,
    prompt_weight: str = "negative_rate",
) -> tuple[Tensor, Tensor]:
    """Negative-aware fine-tuning (Chen et al. 2025, arXiv:2505.18116): maximum likelihood on the right answers, and on
    the wrong ones the likelihood of an implicit negative policy built from the same model, token by token.

        R_t   = exp(min(logp_t - old_logp_t, 10))                 the ratio to the sampling policy
        r_q   = clip(group accuracy, 0.02, 0.98)                  the mean reward of the completion's group
        c     = the completion's reward in [0, 1] (1: right)
        pos_t = -log(max(R_t, clamp_positive))
        neg_t = -log(max((1 - r_q * R_t) / (1 - r_q), clamp_negative))     max(.) keeps the gradient of its argument
        loss_t = w(r_q) * (c * pos_t + neg_weight * (1 - c) * neg_t)
        w = 1 (none), 1 - r_q (negative_rate), sqrt((1 - r_q) / r_q) (grpo)

    On policy (R = 1) with w = 1 - r_q its gradient is Dr. GRPO's, -(c - r_q) * grad logp_t, and with the grpo weight
    GRPO's (the paper's equivalence). Every value is the authors' code (github.com/NVlabs/NFT, dp_actor.py,
    ratio_type "token"): the clamps, `clamp_preserve_grad` (the max keeps its argument's gradient) and the defaults of
    train_7B.sh (neg_weight 1, clamp_negative 1.0, clamp_positive 0.0, normalize 1 = negative_rate); neg_weight 0 is
    RFT. They reduce by the token sum of each sequence over a constant (1000) summed over the batch: use
    `seq_mean_token_sum_norm`, the same up to a constant factor. The recipe keeps groups whose rewards differ
    (`rl.dynamic_sampling`), as the authors filter them (r_q = 0 or 1 is only clamped here).

    rewards_B, group_mean_rewards_B: [B], the rows' rewards as scored (no KL shaping) and their group's mean; rewards
    outside [0, 1] are an error. adv_B_T is accepted for the common signature and not read. Returns (loss_B_T,
    clipped_B_T); clipped marks the tokens whose clamp replaced the value (the gradient is kept).
    Deviations: none in the loss; the ratio's log is clamped at 10 (the authors' value).
    """
    del adv_B_T
    if prompt_weight not in NFT_PROMPT_WEIGHTS:
        allowed = ", ".join(NFT_PROMPT_WEIGHTS)
        raise ValueError(f"policy loss 'nft': prompt_weight={prompt_weight!r}; allowed: {allowed}")
    if bool(((rewards_B < 0) | (rewards_B > 1)).any()):
        raise ValueError("policy loss 'nft': rewards outside [0, 1]; NFT reads a 0/1 verdict (1: right) as each "
                         "sample's weight on the positive side (the authors' correct_mask)")  # fmt: skip
    ratio_B_T = (logp_B_T - old_logp_B_T).clamp(max=_NFT_LOG_RATIO_MAX).exp()
    rate_B = group_mean_rewards_B.detach().to(logp_B_T.dtype).clamp(_NFT_RATE_MIN, _NFT_RATE_MAX)
    right_B = rewards_B.detach().to(logp_B_T.dtype)
    proxy_B_T = (1.0 - rate_B[:, None] * ratio_B_T) / (1.0 - rate_B[:, None])
    negative_B_T = -_clamp_keeping_gradient(proxy_B_T, min=abs(clamp_negative)).log()
    positive_B_T = -_clamp_keeping_gradient(ratio_B_T, min=clamp_positive).log()
    loss_B_T = right_B[:, None] * positive_B_T + neg_weight * (1.0 - right_B[:, None]) * negative_B_T
    if prompt_weight == "negative_rate":
        loss_B_T = loss_B_T * (1.0 - rate_B)[:, None]
    elif prompt_weight == "grpo":
        loss_B_T = loss_B_T * ((1.0 - rate_B) / rate_B).sqrt()[:, None]
    clamped_B_T = torch.where(right_B[:, None] > 0.5, ratio_B_T < clamp_positive, proxy_B_T < abs(clamp_negative))
    return _masked(loss_B_T, mask_B_T), _masked(clamped_B_T.to(logp_B_T.dtype), mask_B_T)
