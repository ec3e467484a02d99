"""Preference losses for a policy's own samples: self-play (SPPO), exploration (XPO), Nash mirror descent
(Nash-MD) and the NLL of selected samples (RAFT). Registered in the same registry as the offline losses
and called the same way (see `objectives/preference.py` for the inputs); `needs` tells the online loop
what to sample and supply:

    win_rates           win_rates_N_K [N, K]: each completion's estimated probability of beating an
                        opponent (by default the other samples of its group)
    mixture_opponents   the opponents are samples of the geometric mixture of policy and reference
    reference_samples   the reference samples too; chosen_from_reference, rejected_from_reference [N] bool

Every loss returns per-example losses [N]; reduction is the caller's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain.objectives.registry import preference_loss


@preference_loss("sppo")
def sppo(logps_N_K: Tensor, ref_logps_N_K: Tensor, win_rates_N_K: Tensor, *, eta: float = 1000.0) -> Tensor:
    """Self-play preference optimisation (Wu et al. 2024, arXiv:2405.00675, Sec. 3, Alg. 1): regress
    each sample's log-ratio to the previous iterate onto its centred win rate.

        r_k  = log pi(y_k|x) - log pi_t(y_k|x)            pi_t = the round's reference (previous iterate)
        p_k  = P_hat(y_k > pi_t | x)                      (win_rates_N_K, estimated from the K samples)
        loss = sum_k (r_k - eta * (p_k - 1/2))^2

    With K = 2 and win rates (1, 0) it is `sppo_hard`. eta=1e3 is the paper's value (its beta = 1/eta =
    1e-3). Inputs [N, K]; returns [N].
    Deviations from the paper: the paper's scripts regress only the best and the worst of the K samples;
    here every sample of the list is regressed (the expectation over y ~ pi_t of the paper's objective).
    """
    r_N_K = logps_N_K - ref_logps_N_K
    return ((r_N_K - eta * (win_rates_N_K - 0.5)) ** 2).sum(dim=-1)


@preference_loss("xpo")
def xpo(
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    chosen_from_reference: Tensor,
    rejected_from_reference: Tensor,
    *,
    beta: float = 0.1,
    alpha: float = 1e-5,
) -> Tensor:
    """Exploratory preference optimisation (Xie et al. 2024, arXiv:2405.21046, Alg. 1): DPO on pairs of a
    policy sample and a reference sample, plus an exploration bonus that lowers the likelihood of the
    reference's samples (optimism: it pushes the policy towards what the reference rarely says).

        loss = -log sigmoid(beta * h)  +  alpha * sum over the pair's reference samples y~ of log pi(y~|x)

    h as in `dpo`; chosen_from_reference, rejected_from_reference: bool [N], which side of each pair the
    reference sampled. alpha=1e-5 is the default of TRL's XPOConfig (the paper tunes it), a trainer TRL had
    in `trl.experimental.xpo` before 1.16 and 1.16 does not have. Inputs [N]; returns [N].
    Deviations from the paper: a pair whose two samples score the same is dropped by the loop, and its
    reference sample's bonus with it (that XPOTrainer kept ties, the policy sample chosen).
    """
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    bonus = torch.where(chosen_from_reference, chosen, 0.0) + torch.where(rejected_from_reference, rejected, 0.0)
    return -F.logsigmoid(beta * h) + alpha * bonus


@preference_loss("nash_md", opponents="mixture")
def nash_md(logps_N_K: Tensor, ref_logps_N_K: Tensor, win_rates_N_K: Tensor, *, beta: float = 0.1) -> Tensor:
    """Nash mirror descent, policy-gradient form (Munos et al. 2023, arXiv:2312.00886, Nash-MD-PG):
    a policy sample y plays a sample y' of the geometric mixture pi^(1-m) * ref^m (the loop samples it);
    REINFORCE on the centred preference, with the KL to the reference as a REINFORCE penalty.

        p_k  = P(y_k > y'_k | x)                            (win_rates_N_K)
        loss = 1/K sum_k [ beta * sg(log pi(y_k|x) - log ref(y_k|x)) * log pi(y_k|x)
                           - (p_k - 1/2) * log pi(y_k|x) ]

    sg = stop-gradient; the samples must come from the current policy (one update per round). Its gradient
    is that of -E[P(y > y')] + beta * KL(pi || ref). beta=0.1 and m=0.5 are the defaults of TRL's
    NashMDConfig, removed with its NashMDTrainer before TRL 1.16 (huggingface/trl#7255).
    Inputs [N, K]; returns [N] (the mean over the K samples of a prompt).
    Deviations from the paper: none in the estimator; that NashMDTrainer weighted each token's log-prob by
    its own token-level log-ratio, we weight the sequence log-prob by the sequence log-ratio (the REINFORCE
    gradient of the sequence-level KL).
    """
    log_ratio_N_K = (logps_N_K - ref_logps_N_K).detach()
    return (beta * log_ratio_N_K * logps_N_K - (win_rates_N_K - 0.5) * logps_N_K).mean(dim=-1)


@preference_loss("nll")
def nll(logps: Tensor, labels: Tensor, lengths: Tensor) -> Tensor:
    """Negative log-likelihood of the desirable completions: supervised fine-tuning on selected samples,
    the update of RAFT (Dong et al. 2023, arXiv:2304.06767, Alg. 1) and rejection-sampling fine-tuning.

        loss = -log pi(y|x) / |y|   where labels is True,   0 elsewhere

    logps: summed completion log-probs [N]; lengths: token counts [N] (clamped >= 1). Returns [N].
    Deviations from the paper: each completion's NLL is its per-token mean (RAFT fine-tunes with the
    usual token mean over the selected batch; equal when lengths are equal).
    """
    return torch.where(labels.bool(), -logps / lengths.clamp(min=1.0), 0.0)


@preference_loss("selm")
def selm(
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    chosen_from_reference: Tensor,
    rejected_from_reference: Tensor,
    *,
    beta: float = 0.01,
    alpha: float = 0.001,
) -> Tensor:
    """Self-exploring language models (Zhang et al. 2024, arXiv:2405.19332): online DPO plus an optimism term that
    lowers the implicit reward of the reference model's own answer, so the policy explores beyond it.

        loss = -log sigmoid(beta * h)  +  alpha * beta * sum over the pair's reference samples y~ of
                                          (log pi(y~|x) - log ref(y~|x))

    h as in `dpo`. This is the authors' `optimistic_dpo_loss` (github.com/shenao-zhang/SELM, scripts/selm_trainer.py):
    `-logsigmoid(beta * logits) + alpha * beta * (policy_response_logps - reference_response_logps)`. Defaults
    beta 0.01 and alpha 0.001 are their Zephyr recipe (recipes/zephyr-selm/selm_config_full.yaml). The reference's
    log-prob carries no gradient, so the gradient is XPO's with alpha * beta as XPO's alpha.
    Inputs [N]; chosen_from_reference, rejected_from_reference: bool [N]. Returns [N].
    Deviations: the authors' y~ is the round's reference model's greedy answer, ranked with the offline chosen and
    rejected answers to pick the pair, and its term applies whether or not it is in the pair; here the reference's
    samples (online.sampling) compete with the policy's for the pair, and the term applies to the pair's sides the
    reference sampled (no term when the pair holds none).
    """
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    from_ref = torch.where(chosen_from_reference, chosen - ref_chosen, 0.0) + torch.where(
        rejected_from_reference, rejected - ref_rejected, 0.0
    )
    return -F.logsigmoid(beta * h) + alpha * beta * from_ref
