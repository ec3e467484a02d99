"""Process rewards: a process reward model's per-step loss, implicit process rewards from a policy/reference
log-ratio, the Clip and Delta refinements that bound a trajectory's process return, and PRIME's advantage.

Steps are marked on a sequence by `step_end_B_T` (bool [B, T]): True at the last token of each step, where a PRM
reads its score and where the step's reward is delivered. A completion's last token always ends a step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain.objectives.advantages import _normalise_over_tokens, _require_groups
from posttrain.objectives.registry import advantage, preference_loss, reward_model_loss


@reward_model_loss("process_bce")
def process_bce(step_logits_S: Tensor, step_labels_S: Tensor) -> Tensor:
    """Per-step binary cross-entropy of a process reward model (PRM; Lightman et al. 2023, arXiv:2305.20050;
    Math-Shepherd, Wang et al. 2023, arXiv:2312.08935), one logit read at the last token of each step.

        loss_s = -[y_s log sigmoid(l_s) + (1 - y_s) log sigmoid(-l_s)]       p(step s is right) = sigmoid(l_s)

    step_logits_S: [S] the logit at the last token (the separator) of each labelled step of the batch;
    step_labels_S: [S] bool, True for a right step. Returns [S]; reduction is the caller's.
    Deviations: TRL's former PRMTrainer (trl.experimental.prm; the trl==1.16.0 wheel has none) gives the token
    classifier 2 labels and a softmax cross-entropy; one logit with a sigmoid is the same model (a 2-class softmax
    depends on the difference of its logits only), and its head is then also a one-label sequence classifier that
    scores a text ending at a step's separator.
    """
    return F.binary_cross_entropy_with_logits(step_logits_S, step_labels_S.to(step_logits_S.dtype), reduction="none")


@preference_loss("implicit_prm")
def implicit_prm(logps: Tensor, labels: Tensor, ref_logps: Tensor, *, beta: float = 0.05) -> Tensor:
    """Implicit PRM: an outcome reward model parameterised as a log-likelihood ratio, trained with cross-entropy on
    outcome labels (Yuan et al. 2024, "Free Process Rewards without Process Labels", arXiv:2412.01981, Sec. 3,
    its CE objective; the loss PRIME updates online, Cui et al. 2025, arXiv:2502.01456).

        r(y)  = beta * (log pi(y|x) - log ref(y|x))
        loss  = -[l log sigmoid(r) + (1 - l) log sigmoid(-r)]          l = 1 for a right outcome, 0 for a wrong one

    Trained so, the model's partial sums q_t = beta * sum_{i <= t} log pi(y_i|y_<i) / ref(y_i|y_<i) are Q values
    (the paper's Proposition 3.1): `implicit_token_rewards`, `step_values`, `step_rewards_from_tokens` read the
    process rewards from it. logps, ref_logps: summed completion log-probs [N]; labels: bool [N]. Returns [N].
    beta = 0.05: PRIME's beta_train (verl recipe/prime). Deviations from the paper: none; it is `bco` without the
    reward shift.
    """
    r = beta * (logps - ref_logps)
    return -F.logsigmoid(torch.where(labels.bool(), r, -r))


def implicit_token_rewards(logp_B_T: Tensor, ref_logp_B_T: Tensor, mask_B_T: Tensor, *, beta: float) -> Tensor:
    """Implicit per-token process rewards (Yuan et al. 2024, arXiv:2412.01981, Eq. 3): beta * log pi(y_t|y_<t) /
    ref(y_t|y_<t) at the completion tokens, 0 elsewhere. Their sum over a completion is its outcome reward r(y).

    logp_B_T, ref_logp_B_T: [B, T] the implicit PRM's and its reference's log-probs; mask_B_T: [B, T] bool.
    Returns [B, T], detached.
    """
    return torch.where(mask_B_T, beta * (logp_B_T - ref_logp_B_T), 0.0).detach()


def step_values(token_rewards_B_T: Tensor, step_end_B_T: Tensor) -> Tensor:
    """The Q value of each step (Yuan et al. 2024, arXiv:2412.01981, Eq. 3): q_k = sum of the token rewards up to
    and including step k's last token, at that token; 0 elsewhere. [B, T] -> [B, T]."""
    return torch.where(step_end_B_T, token_rewards_B_T.cumsum(dim=1), 0.0)


def step_rewards_from_tokens(token_rewards_B_T: Tensor, step_end_B_T: Tensor) -> Tensor:
    """Step rewards from token rewards (Yuan et al. 2024, arXiv:2412.01981, Eq. 4): r_k = q_k - q_{k-1}, the sum of
    step k's token rewards, delivered at its last token (q_0 = 0). Token rewards after the last step's end are left
    out (a completion's last token ends a step, so there are none). [B, T] -> [B, T], 0 off step ends."""
    q_B_T = token_rewards_B_T.cumsum(dim=1)
    before_B = torch.zeros_like(q_B_T[:, 0])
    out_T = []
    for t in range(q_B_T.shape[1]):
        end_B = step_end_B_T[:, t]
        out_T.append(torch.where(end_B, q_B_T[:, t] - before_B, 0.0))
        before_B = torch.where(end_B, q_B_T[:, t], before_B)
    return torch.stack(out_T, dim=1)


def clip_step_rewards(step_scores_B_T: Tensor, step_end_B_T: Tensor, *, eta: float) -> Tensor:
    """The Clip mechanism (Gao et al. 2024, arXiv:2410.15115, Sec. 5): a step's process reward is its PRM score
    minus a threshold, clipped from above at 0, so that no trajectory gains from adding steps.

        r~_k = min(r_k - eta, 0)

    step_scores_B_T: [B, T] the PRM's score of each step (p(step right) in [0, 1]) at its last token. Returns
    [B, T], 0 off step ends. Deviations from the paper: none.
    """
    return torch.where(step_end_B_T, (step_scores_B_T - eta).clamp(max=0.0), 0.0)


def delta_step_rewards(step_scores_B_T: Tensor, step_end_B_T: Tensor) -> Tensor:
    """The Delta mechanism (Gao et al. 2024, arXiv:2410.15115, Sec. 5): a step's process reward is its score minus
    the next step's, and the last step's score is dropped, so the process return from step k telescopes to
    r_k - r_K, bounded whatever the number of steps.

        r~_k = r_k - r_{k+1}   (k < K),      r~_K = 0

    step_scores_B_T: [B, T] as in `clip_step_rewards`. Returns [B, T], 0 off step ends.
    Deviations: none known; the last step's 0 is read from the paper's Fig. 3, where the last step's reward is
    struck out of the Delta mechanism.
    """
    next_B = torch.zeros_like(step_scores_B_T[:, 0])
    has_next_B = torch.zeros_like(step_end_B_T[:, 0])
    out_T = []
    for t in reversed(range(step_scores_B_T.shape[1])):
        end_B = step_end_B_T[:, t]
        out_T.append(torch.where(end_B & has_next_B, step_scores_B_T[:, t] - next_B, 0.0))
        next_B = torch.where(end_B, step_scores_B_T[:, t], next_B)
        has_next_B = has_next_B | end_B
    return torch.stack(out_T[::-1], dim=1)


@advantage("prime")
def prime(
    rewards_PG: Tensor,
    process_rewards_B_T: Tensor,
    mask_B_T: Tensor,
    *,
    group_size: int,
    outcome_coef: float = 5.0,
    process_coef: float = 5.0,
    whiten: bool = True,
) -> Tensor:
    """PRIME's advantage (Cui et al. 2025, arXiv:2502.01456, Sec. 3.3): leave-one-out baselines taken on the
    outcome rewards and on the implicit process rewards separately, summed into returns, whitened.

        outcome, at each completion's last token:  o_i - 1/(G-1) sum_{j != i} o_j
        process, at each token t of completion i:  r_t^i G/(G-1) - 1/(G-1) sum_j mean_t(r^j)
        A_t^i = sum_{s >= t} [outcome_coef * outcome_s + process_coef * process_s]        (gamma = 1)
        whiten:  A <- (A - mean A) / std A     over the step's completion tokens

    For a reward on one token (the outcome) the process line is RLOO exactly; for token rewards it uses each
    completion's mean token reward as that completion's reward in the others' baselines.

    rewards_PG: [P*G] outcome rewards (the verifier's); process_rewards_B_T: [P*G, T] the implicit PRM's rewards at
    completion tokens; mask_B_T: [P*G, T] bool. Returns [P*G, T], zero outside the mask, detached.
    Defaults: outcome_coef = process_coef = 5 (verl recipe/prime: reward_gt_coef, reward_dpo_coef).
    Deviations: as the reference implementation (verl recipe/prime, `compute_rloo_advantage_return`), which the
    paper's results come from; its whitening uses the unbiased variance (ours the biased one with a 1e-8 floor, as
    every estimator here: a factor sqrt(N / (N - 1))), and a completion without tokens has baseline 0, not NaN.
    """
    _require_groups("prime", group_size, 2)
    mask_B_T = mask_B_T.bool()
    g = group_size
    process_B_T = torch.where(mask_B_T, process_rewards_B_T.detach(), 0.0)
    mean_B = process_B_T.sum(dim=1) / mask_B_T.sum(dim=1).clamp(min=1)
    baseline_B = (mean_B.view(-1, g).sum(dim=1, keepdim=True) / (g - 1)).expand(-1, g).flatten()
    process_B_T = torch.where(mask_B_T, process_B_T * g / (g - 1) - baseline_B[:, None], 0.0)
    r_P_G = rewards_PG.detach().view(-1, g)
    outcome_B = (r_P_G - (r_P_G.sum(dim=1, keepdim=True) - r_P_G) / (g - 1)).flatten()
    positions_B_T = torch.arange(mask_B_T.shape[1], device=mask_B_T.device).expand_as(mask_B_T)
    last_B = torch.where(mask_B_T, positions_B_T, -1).amax(dim=1)
    outcome_B_T = torch.where(positions_B_T == last_B[:, None], outcome_B[:, None], 0.0)
    total_B_T = outcome_coef * outcome_B_T + process_coef * process_B_T
    returns_B_T = torch.where(mask_B_T, total_B_T.flip(1).cumsum(dim=1).flip(1), 0.0)
    if whiten:
        return _normalise_over_tokens(returns_B_T, mask_B_T, scale_std=True)
    return returns_B_T
