"""Offline preference losses: the DPO family, reference-free variants, unpaired and listwise losses.

Every loss is a pure function registered with `@preference_loss(name)`, its needs read from its inputs. The training
loop calls it with the inputs its signature names and the recipe's `pref.loss_args` as keywords:

    paired      chosen, rejected [N]            summed completion log-probs under the policy
    reference   ref_chosen, ref_rejected [N]    the same under the reference model
    lengths     chosen_len, rejected_len [N]    completion token counts (float)
    unpaired    logps [N], labels [N] (bool, True = desirable); with reference: ref_logps [N]
    kl_reference_point  kl_ref_point (0-dim)    KTO's z0, detached and clamped >= 0 by the loop
    reward_shift        reward_shift (0-dim)    BCO: running mean of logps - ref_logps of earlier steps
    listwise    logps_N_K, scores_N_K; with reference: ref_logps_N_K; with win_rates: win_rates_N_K

Every loss returns per-example losses [N]; reduction is the caller's. Notation used below:

    r_w = chosen - ref_chosen,  r_l = rejected - ref_rejected      (log-ratios, "implicit rewards"/beta)
    h   = r_w - r_l

`TRL_LOSS_TYPES` maps our registered names to the TRL 1.16 trainer and `loss_type` that compute the same
per-example loss (docs/preference.md states every difference).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain.objectives.registry import preference_loss

# Our name -> (TRL 1.16 trainer by import path, its loss_type) computing the same per-example loss, or None where
# TRL 1.16 has no trainer that does. loss_type None: the trainer has one loss (ORPO); "a+b": loss_type=["a", "b"].
# docs/preference.md states every difference; TRL 1.16 has no XPO, Nash-MD or BCO trainer.
TRL_LOSS_TYPES: dict[str, tuple[str, str | None] | None] = {
    "dpo": ("trl.DPOTrainer", "sigmoid"),  # TRL 1.16's sigmoid has no label smoothing (cDPO); ours does
    "robust_dpo": ("trl.DPOTrainer", "robust"),
    "ipo": ("trl.DPOTrainer", "ipo"),
    "hinge": ("trl.DPOTrainer", "hinge"),
    "exo": ("trl.DPOTrainer", "exo_pair"),
    "nca": ("trl.DPOTrainer", "nca_pair"),
    "bco": ("trl.DPOTrainer", "bco_pair"),  # bco_pair = our bco on both rows of a pair, summed, reward_shift=0
    "sppo_hard": ("trl.DPOTrainer", "sppo_hard"),  # TRL beta = 1 / eta
    "aot": ("trl.DPOTrainer", "aot"),
    "apo_zero": ("trl.DPOTrainer", "apo_zero"),
    "apo_down": ("trl.DPOTrainer", "apo_down"),
    "rpo": ("trl.DPOTrainer", "sigmoid+sft"),  # loss_weights=[1, alpha]; sft: a token mean over the batch
    "simpo": ("trl.experimental.cpo.CPOTrainer", "simpo"),  # with cpo_alpha=0 and simpo_gamma=gamma
    "cpo": ("trl.experimental.cpo.CPOTrainer", "sigmoid"),  # cpo_alpha=alpha; NLL: a token mean over the batch
    "orpo": ("trl.experimental.orpo.ORPOTrainer", None),  # beta = lam; its NLL also covers the prompt tokens
    "kto": ("trl.KTOTrainer", "kto"),  # desirable_weight = lam_d, undesirable_weight = lam_u
    "dpop": None,
    "xpo": None,  # TRL 1.16 has no XPO trainer
    "nash_md": None,  # nor a Nash-MD one
    "sppo": None,  # TRL has only sppo_hard
    "nll": None,
    "lipo_lambda": None,
    "plackett_luce": None,
    "cpl": None,  # TRL 1.16 has no CPL
    "selm": None,  # nor SELM
}


def _log_ratios(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor):
    return chosen - ref_chosen, rejected - ref_rejected


@preference_loss("dpo")
def dpo(
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Direct preference optimisation (Rafailov et al. 2023, arXiv:2305.18290, Eq. 7), with the
    conservative-DPO label smoothing of Mitchell 2023 ("A note on DPO with noisy preferences", cDPO).

        h    = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]
        loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h),   eps = label_smoothing

    eps = 0 is the paper's DPO. Inputs: summed completion log-probs [N]. Returns [N].
    Deviations from the paper: none (label_smoothing defaults to 0).
    """
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


@preference_loss("robust_dpo")
def robust_dpo(
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = 0.1,
    epsilon: float = 0.1,
) -> Tensor:
    """Robust DPO: the unbiased DPO loss under labels flipped with probability epsilon
    (Chowdhury et al. 2024, arXiv:2403.00409).

        loss = [(1 - eps) * (-log sigmoid(beta*h)) - eps * (-log sigmoid(-beta*h))] / (1 - 2*eps)

    h as in `dpo`. Requires 0 <= epsilon < 0.5. Inputs [N]; returns [N] (can be negative: an unbiased
    estimate, not a likelihood). Deviations from the paper: none.
    """
    if not 0.0 <= epsilon < 0.5:
        raise ValueError(f"robust_dpo: epsilon={epsilon} must be in [0, 0.5) (a label-flip rate)")
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    clean = -(1 - epsilon) * F.logsigmoid(beta * h)
    flipped = -epsilon * F.logsigmoid(-beta * h)
    return (clean - flipped) / (1 - 2 * epsilon)


@preference_loss("ipo")
def ipo(
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    chosen_len: Tensor,
    rejected_len: Tensor,
    *,
    tau: float = 0.1,
    length_normalized: bool = True,
) -> Tensor:
    """Identity preference optimisation (Azar et al. 2023, arXiv:2310.12036, Eq. 17).

        length_normalized=True  (default):  h = r_w / |y_w| - r_l / |y_l|
        length_normalized=False (Eq. 17):   h = r_w - r_l
        loss = (h - 1 / (2 * tau))^2

    r_w, r_l: policy/reference log-ratios of the summed completion log-probs; |y| = token counts
    (clamped >= 1). Inputs [N]; returns [N].
    Deviations from the paper: by default the log-ratios are averaged per token, as TRL does and as the
    IPO authors told TRL their reported results were computed; with summed log-ratios the square grows
    with completion length and tau means different things for short and long completions.
    `length_normalized=False` is Eq. 17 exactly.
    """
    r_w, r_l = _log_ratios(chosen, rejected, ref_chosen, ref_rejected)
    if length_normalized:
        r_w, r_l = r_w / chosen_len.clamp(min=1.0), r_l / rejected_len.clamp(min=1.0)
    return (r_w - r_l - 1 / (2 * tau)) ** 2


@preference_loss("hinge")
def hinge(
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = 0.1,
) -> Tensor:
    """SLiC hinge (calibration) loss (Zhao et al. 2023, arXiv:2305.10425, Eq. 1), on reference-
    normalised log-ratios as in RSO (Liu et al. 2023, arXiv:2309.06657).

        loss = max(0, 1 - beta * h) = beta * max(0, delta - h),   delta = 1 / beta

    h as in `dpo`. Inputs [N]; returns [N].
    Deviations from the paper: SLiC-HF's margin is on policy log-probs without a reference and without
    the 1/delta scale; we use the reference-normalised form (RSO, TRL's "hinge") so beta means what it
    means for the rest of the family. SLiC's regularisation term (NLL of a target) is `rpo`'s alpha term.
    """
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    return torch.relu(1 - beta * h)


@preference_loss("simpo")
def simpo(
    chosen: Tensor,
    rejected: Tensor,
    chosen_len: Tensor,
    rejected_len: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
) -> Tensor:
    """Simple preference optimisation (Meng et al. 2024, arXiv:2405.14734, Eq. 6): reference-free,
    length-normalised, with a target reward margin gamma.

        loss = -log sigmoid(beta / |y_w| * log pi(y_w|x) - beta / |y_l| * log pi(y_l|x) - gamma)

    |y| = completion token counts (clamped >= 1). Defaults beta=2.0, gamma=1.0 are the paper's
    Llama-3-Base setting (gamma/beta = 0.5); the paper tunes beta in [2, 2.5], gamma in [0.3, 1.6].
    Inputs [N]; returns [N]. Deviations from the paper: none.
    """
    margin = beta * (chosen / chosen_len.clamp(min=1.0) - rejected / rejected_len.clamp(min=1.0))
    return -F.logsigmoid(margin - gamma)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


# exp(-1e-6) ~ 1 - 1e-6: probabilities closer to 1 make the odds infinite (log(1-p) = -inf).
_MAX_MEAN_LOGP = -1e-6


@preference_loss("orpo")
def orpo(
    chosen: Tensor,
    rejected: Tensor,
    chosen_len: Tensor,
    rejected_len: Tensor,
    *,
    lam: float = 0.1,
) -> Tensor:
    """Odds-ratio preference optimisation (Hong et al. 2024, arXiv:2403.07691, Eqs. 4-7).

        p_w  = exp(log pi(y_w|x) / |y_w|),  p_l likewise         (per-token geometric-mean likelihood)
        odds(p) = p / (1 - p)
        loss = -log pi(y_w|x) / |y_w|  +  lam * -log sigmoid(log odds(p_w) - log odds(p_l))

    Reference-free. Inputs: summed completion log-probs and token counts [N]; returns [N]. lam=0.1 is the
    paper's value for its Phi-2 and Llama-2 runs (TRL calls it beta).
    Deviations: the NLL term is the chosen completion's per-token mean, pair by pair (the NLL of y_w given
    x). The authors' code and TRL 1.16 (`trl.experimental.orpo.ORPOTrainer.concatenated_forward`) take
    the cross-entropy over every token of prompt + chosen after the first, averaged over all such tokens
    of the batch: with prompts the two NLL terms differ whatever the lengths; the odds-ratio term is the
    same. The mean log-prob is clamped to <= -1e-6 so that a saturated probability gives finite odds.
    """
    mean_w = (chosen / chosen_len.clamp(min=1.0)).clamp(max=_MAX_MEAN_LOGP)
    mean_l = (rejected / rejected_len.clamp(min=1.0)).clamp(max=_MAX_MEAN_LOGP)
    log_odds = (mean_w - mean_l) - (_log1mexp(mean_w) - _log1mexp(mean_l))
    return -chosen / chosen_len.clamp(min=1.0) - lam * F.logsigmoid(log_odds)


@preference_loss("cpo")
def cpo(
    chosen: Tensor,
    rejected: Tensor,
    chosen_len: Tensor,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
) -> Tensor:
    """Contrastive preference optimisation (Xu et al. 2024, arXiv:2401.08417, Eq. 3 + L_NLL):
    reference-free DPO (the reference dropped as a uniform prior) plus NLL on the chosen completion.

        loss = -log sigmoid(beta * (log pi(y_w|x) - log pi(y_l|x)))  +  alpha * -log pi(y_w|x) / |y_w|

    Inputs: summed log-probs [N] and chosen token counts [N]; returns [N]. alpha=1 is the paper's
    unweighted sum (TRL's cpo_alpha).
    Deviations from the paper: the NLL is each pair's per-token mean over the chosen completion; the
    paper and TRL 1.16 (`trl.experimental.cpo.CPOTrainer`, completion tokens only) average over all
    chosen tokens of the batch (equal when chosen lengths are equal).
    """
    return -F.logsigmoid(beta * (chosen - rejected)) - alpha * chosen / chosen_len.clamp(min=1.0)


@preference_loss("kto")
def kto(
    logps: Tensor,
    labels: Tensor,
    ref_logps: Tensor,
    kl_ref_point: Tensor,
    *,
    beta: float = 0.1,
    lam_d: float = 1.0,
    lam_u: float = 1.0,
) -> Tensor:
    """Kahneman-Tversky optimisation (Ethayarajh et al. 2024, arXiv:2402.01306, Eq. 7).

        r    = log pi(y|x) - log ref(y|x)
        z0   = kl_ref_point  (batch estimate of KL(pi || ref) from mismatched pairs, detached, >= 0)
        desirable:    loss = lam_d * (1 - sigmoid(beta * (r - z0)))
        undesirable:  loss = lam_u * (1 - sigmoid(beta * (z0 - r)))

    (= lambda_y - v(x, y) of the paper.) logps, ref_logps: summed log-probs [N]; labels: bool [N],
    True = desirable; kl_ref_point: 0-dim. Returns [N] in input order.
    Deviations from the paper: none. The paper's advice (lam_d * n_D / (lam_u * n_U) in [1, 4/3]) is the
    caller's to check.
    """
    r = logps - ref_logps
    desirable = lam_d * torch.sigmoid(-beta * (r - kl_ref_point))  # 1 - sigmoid(x) = sigmoid(-x)
    undesirable = lam_u * torch.sigmoid(-beta * (kl_ref_point - r))
    return torch.where(labels.bool(), desirable, undesirable)


@preference_loss("bco")
def bco(
    logps: Tensor,
    labels: Tensor,
    ref_logps: Tensor,
    reward_shift: Tensor,
    *,
    beta: float = 0.1,
) -> Tensor:
    """Binary classifier optimisation (Jung et al. 2024, arXiv:2404.04656, with its reward shift
    delta): a logistic classifier whose logit is the implicit reward.

        r_theta = beta * (log pi(y|x) - log ref(y|x))
        delta   = beta * reward_shift
        desirable:    loss = -log sigmoid(r_theta - delta)
        undesirable:  loss = -log sigmoid(-(r_theta - delta))

    reward_shift (0-dim, detached) is the running mean of log pi - log ref over the completions of
    earlier steps, desirable and undesirable alike, which the loop maintains; delta is then the paper's
    running mean of r_theta. Inputs [N], labels bool [N]; returns [N].
    Deviations from the paper: the underlying-distribution-matching (UDM) density-ratio weights are not
    applied (the paper's BCO without UDM); the running mean covers earlier steps only (TRL before 1.16,
    in its BCOTrainer and old bco_pair, folded the current batch in first; at the first step both are 0,
    as policy = reference). TRL 1.16 has no BCO trainer; with reward_shift=0, the losses of the two rows
    of a pair sum to TRL 1.16's DPOTrainer bco_pair, which has no shift.
    """
    shifted = beta * (logps - ref_logps - reward_shift)
    return -F.logsigmoid(torch.where(labels.bool(), shifted, -shifted))


@preference_loss("nca")
def nca(
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = 0.1,
) -> Tensor:
    """Noise-contrastive alignment, pairwise form (Chen et al. 2024, arXiv:2402.05369, the K=2 case).

        loss = -log sigmoid(beta * r_w) - 1/2 * log sigmoid(-beta * r_w) - 1/2 * log sigmoid(-beta * r_l)

    r_w, r_l: policy/reference log-ratios. Inputs [N]; returns [N]. Deviations from the paper: none.
    """
    r_w, r_l = _log_ratios(chosen, rejected, ref_chosen, ref_rejected)
    return -F.logsigmoid(beta * r_w) - 0.5 * F.logsigmoid(-beta * r_w) - 0.5 * F.logsigmoid(-beta * r_l)


@preference_loss("exo")
def exo(
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = 0.1,
    epsilon: float = 1e-3,
) -> Tensor:
    """Efficient exact optimisation, pair form (Ji et al. 2024, arXiv:2402.00856, Eq. 16, K=2):
    reverse KL from the policy's pair distribution to the (label-smoothed) preference distribution.

        q_w = sigmoid(beta * h),   q_l = sigmoid(-beta * h)      (softmax of beta*r over the pair)
        p_w = 1 - epsilon,         p_l = epsilon
        loss = q_w * (log q_w - log p_w) + q_l * (log q_l - log p_l)

    h as in `dpo`; 0 < epsilon < 1 (the paper suggests 1e-3). Inputs [N]; returns [N].
    Deviations from the paper: none.
    """
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"exo: epsilon={epsilon} must be in (0, 1); log(epsilon) is part of the loss")
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    q_w, q_l = torch.sigmoid(beta * h), torch.sigmoid(-beta * h)
    kl_w = q_w * (F.logsigmoid(beta * h) - math.log1p(-epsilon))
    kl_l = q_l * (F.logsigmoid(-beta * h) - math.log(epsilon))
    return kl_w + kl_l


@preference_loss("apo_zero")
def apo_zero(
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = 0.1,
) -> Tensor:
    """Anchored preference optimisation, APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 7):
    for chosen completions better than the model's own; raises chosen, lowers rejected.

        loss = (1 - sigmoid(beta * r_w)) + sigmoid(beta * r_l)

    Inputs [N]; returns [N]. Deviations from the paper: none.
    """
    r_w, r_l = _log_ratios(chosen, rejected, ref_chosen, ref_rejected)
    return torch.sigmoid(-beta * r_w) + torch.sigmoid(beta * r_l)


@preference_loss("apo_down")
def apo_down(
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = 0.1,
) -> Tensor:
    """Anchored preference optimisation, APO-down (D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 8):
    for chosen completions worse than the model's own; lowers chosen, rejected more.

        loss = sigmoid(beta * r_w) + (1 - sigmoid(beta * (r_w - r_l)))

    Inputs [N]; returns [N]. d loss / d chosen may be positive by design. Deviations from the paper: none.
    """
    r_w, r_l = _log_ratios(chosen, rejected, ref_chosen, ref_rejected)
    return torch.sigmoid(beta * r_w) + torch.sigmoid(-beta * (r_w - r_l))


@preference_loss("aot", whole_batch=True)
def aot(
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Alignment via optimal transport, paired variant (Melnyk et al. 2024, arXiv:2406.05882):
    first-order stochastic dominance of the policy's chosen-vs-rejected margin over the reference's,
    enforced on sorted samples (1-D optimal transport) with a logistic relaxation.

        m_i     = log pi(y_w,i) - log pi(y_l,i),   m_ref_i = log ref(y_w,i) - log ref(y_l,i)
        d_(k)   = sort(m)_k - sort(m_ref)_k                    (k-th smallest of each, k = 1..N)
        loss_k  = -(1 - eps) * log sigmoid(beta * d_(k)) - eps * log sigmoid(-beta * d_(k))

    Inputs [N]; returns [N] indexed by quantile k, NOT by pair: the loss couples the whole batch, so its
    value depends on which pairs share a call. Use the mean; `whole_batch` makes the config refuse micro-batches
    that would split a step. eps = label_smoothing.
    Deviations from the paper: none beyond TRL's choice of the paired (not unpaired) variant.
    """
    margin_sorted, _ = torch.sort(chosen - rejected)
    ref_margin_sorted, _ = torch.sort(ref_chosen - ref_rejected)
    d = margin_sorted - ref_margin_sorted
    return -(1 - label_smoothing) * F.logsigmoid(beta * d) - label_smoothing * F.logsigmoid(-beta * d)


@preference_loss("sppo_hard")
def sppo_hard(
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    eta: float = 1000.0,
) -> Tensor:
    """Self-play preference optimisation with hard win probabilities (Wu et al. 2024, arXiv:2405.00675,
    Eq. 4.7 with P(y_w > others) = 1, P(y_l > others) = 0).

        loss = (r_w - eta / 2)^2 + (r_l + eta / 2)^2

    r = log pi(y|x) - log pi_t(y|x), pi_t = the previous iterate (the reference). eta=1e3 is the paper's
    value (TRL's beta = 1 / eta). Inputs [N]; returns [N].
    Deviations from the paper: hard 0/1 win probabilities instead of PairRM-estimated ones.
    """
    r_w, r_l = _log_ratios(chosen, rejected, ref_chosen, ref_rejected)
    return (r_w - eta / 2) ** 2 + (r_l + eta / 2) ** 2


@preference_loss("rpo")
def rpo(
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    chosen_len: Tensor,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
) -> Tensor:
    """Iterative reasoning preference optimisation, DPO + NLL (Pang et al. 2024, arXiv:2404.19733).

        loss = -log sigmoid(beta * h)  +  alpha * -log pi(y_w|x) / |y_w|

    h as in `dpo`; |y_w| = chosen token count. alpha=1 is the paper's value. Inputs [N]; returns [N].
    Deviations from the paper: the NLL is normalised by the completion's token count (the paper
    normalises by the length of the reasoning + answer, i.e. the completion: the same thing).
    """
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    return -F.logsigmoid(beta * h) - alpha * chosen / chosen_len.clamp(min=1.0)


@preference_loss("dpop")
def dpop(
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = 0.1,
    lam: float = 50.0,
) -> Tensor:
    """DPO-Positive (Pal et al. 2024, arXiv:2402.13228): DPO with a penalty inside the sigmoid
    whenever the chosen completion falls below its reference likelihood.

        loss = -log sigmoid(beta * (h - lam * max(0, log ref(y_w|x) - log pi(y_w|x))))

    h as in `dpo`. lam=50 is the paper's value for its Smaug models. Inputs [N]; returns [N].
    Deviations from the paper: none.
    """
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    penalty = torch.relu(ref_chosen - chosen)
    return -F.logsigmoid(beta * (h - lam * penalty))


@preference_loss("lipo_lambda")
def lipo_lambda(
    logps_N_K: Tensor,
    scores_N_K: Tensor,
    ref_logps_N_K: Tensor,
    *,
    beta: float = 0.1,
) -> Tensor:
    """LiPO-lambda: listwise preference optimisation with LambdaLoss weights (Liu et al. 2024,
    arXiv:2402.01878).

        s_i       = beta * (log pi(y_i|x) - log ref(y_i|x))
        tau(i)    = rank of y_i when the list is sorted by s, descending, 1-based (no gradient)
        G_i       = 2^psi_i - 1,   D(tau) = log2(1 + tau)          psi = scores_N_K (labels)
        Delta_ij  = |G_i - G_j| * |1/D(tau(i)) - 1/D(tau(j))|
        loss      = sum over pairs with psi_i > psi_j of  Delta_ij * -log sigmoid(s_i - s_j)

    Inputs [N, K] (K completions per prompt); returns [N]. Ties in s take the order of the list.
    Deviations from the paper: none; the discount base (log2, the NDCG convention of LambdaLoss) only
    scales the loss by a constant.
    """
    s_N_K = beta * (logps_N_K - ref_logps_N_K)
    k = s_N_K.shape[-1]
    with torch.no_grad():
        order_N_K = torch.argsort(s_N_K, dim=-1, descending=True, stable=True)
        positions = torch.arange(1, k + 1, dtype=s_N_K.dtype, device=s_N_K.device).expand_as(s_N_K)
        rank_N_K = torch.empty_like(s_N_K).scatter_(-1, order_N_K, positions)
        inv_discount_N_K = 1.0 / torch.log2(1.0 + rank_N_K)
        gain_N_K = torch.pow(2.0, scores_N_K.to(s_N_K.dtype)) - 1.0
        delta_N_K_K = (gain_N_K[:, :, None] - gain_N_K[:, None, :]).abs() * (
            inv_discount_N_K[:, :, None] - inv_discount_N_K[:, None, :]
        ).abs()
        better_N_K_K = scores_N_K[:, :, None] > scores_N_K[:, None, :]
    pair_loss_N_K_K = -F.logsigmoid(s_N_K[:, :, None] - s_N_K[:, None, :])
    return (torch.where(better_N_K_K, delta_N_K_K * pair_loss_N_K_K, 0.0)).sum(dim=(1, 2))


def _plackett_luce_nll(logits_N_K: Tensor, scores_N_K: Tensor) -> Tensor:
    """-log P(ranking by scores) under Plackett-Luce with these logits.

        tau  = the completions sorted by score, descending (ties keep list order)
        loss = sum_{k=1..K} [ log sum_{j>=k} exp(logit_tau(j)) - logit_tau(k) ]

    logits_N_K, scores_N_K: [N, K]; returns [N].
    """
    order_N_K = torch.argsort(scores_N_K, dim=-1, descending=True, stable=True)
    ranked_N_K = torch.gather(logits_N_K, -1, order_N_K)
    tail_lse_N_K = torch.flip(torch.logcumsumexp(torch.flip(ranked_N_K, [-1]), dim=-1), [-1])
    return (tail_lse_N_K - ranked_N_K).sum(dim=-1)


@preference_loss("plackett_luce")
def plackett_luce(
    logps_N_K: Tensor,
    scores_N_K: Tensor,
    ref_logps_N_K: Tensor,
    *,
    beta: float = 0.1,
) -> Tensor:
    """Listwise DPO under a Plackett-Luce ranking model (Rafailov et al. 2023, arXiv:2305.18290,
    Appendix A.3).

        u_i  = beta * (log pi(y_i|x) - log ref(y_i|x))
        tau  = the K completions ranked by scores_N_K, best first
        loss = -log prod_{k=1..K} exp(u_tau(k)) / sum_{j=k..K} exp(u_tau(j))

    Inputs [N, K]; returns [N]. K=2 is `dpo`. Deviations from the paper: none; tied scores are ranked
    in list order (the paper assumes a strict ranking).
    """
    return _plackett_luce_nll(beta * (logps_N_K - ref_logps_N_K), scores_N_K)


@preference_loss("cpl")
def cpl(
    chosen: Tensor,
    rejected: Tensor,
    chosen_len: Tensor,
    rejected_len: Tensor,
    *,
    alpha: float = 0.1,
    lam: float = 0.5,
    bc_coef: float = 0.0,
) -> Tensor:
    """Contrastive preference learning (Hejna et al. 2023, arXiv:2310.13639): a preference's likelihood under the
    regret model, with the policy's log-probs as the (scaled) advantages, and a conservative bias lam on the rejected
    side; reference-free.

        loss = -log sigmoid(alpha * log pi(y_w|x) - lam * alpha * log pi(y_l|x))
               + bc_coef * -(log pi(y_w|x) + log pi(y_l|x)) / (|y_w| + |y_l|)

    = -log [exp(alpha S_w) / (exp(alpha S_w) + exp(lam alpha S_l))], S = the completion's summed log-prob (the
    discount is 1 for a completion). lam = 1 is the unbiased CPL. Inputs: summed log-probs and token counts [N];
    returns [N]. Defaults are the authors' (github.com/jhejna/cpl, configs/mw_state_dense/cpl.yaml): alpha 0.1,
    contrastive_bias 0.5, bc_coeff 0; 0 < lam <= 1 (their code asserts it).
    Deviations: the behaviour-cloning term (the authors' `bc_loss`, a mean over every step of both segments) is each
    pair's per-token mean; the authors' warm-up of pure BC steps (`bc_steps`) is an SFT run before this one.
    """
    if not 0.0 < lam <= 1.0:
        raise ValueError(f"cpl: lam={lam} must be in (0, 1] (the conservative bias on the rejected side)")
    bc = -(chosen + rejected) / (chosen_len + rejected_len).clamp(min=1.0)
    return -F.logsigmoid(alpha * chosen - lam * alpha * rejected) + bc_coef * bc
