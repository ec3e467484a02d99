"""Preference losses against hand-computed values, TRL 1.16's formulas written out, edge cases and the
sign of the gradient.

Notation in the comments: r_w = chosen - ref_chosen, r_l = rejected - ref_rejected, h = r_w - r_l,
sp(x) = -log sigmoid(x) = log(1 + e^-x); sp(0) = log 2 = 0.693147, sp(1) = 0.313262, sp(-1) = 1.313262.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain.objectives import preference as P
from posttrain.objectives.registry import PREFERENCE_LOSSES


def t(values: list[float]) -> Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(actual: Tensor, expected: list[float], atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, t(expected), atol=atol, rtol=0)


def call(fn, inputs: dict[str, Tensor], **hyper):
    """Call a loss as the training loop does: the inputs its signature names, hyper-parameters by keyword."""
    params = inspect.signature(fn).parameters.values()
    named = [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    return fn(*[inputs[name] for name in named], **hyper)


# Two pairs used by most tests:
#   pair 0: chosen -1, rejected -2, ref -1.5 / -2.5 -> r_w = 0.5, r_l = 0.5, h = 0
#   pair 1: chosen -1, rejected -3, ref -2 / -2     -> r_w = 1,   r_l = -1,  h = 2
PAIRS = dict(
    chosen=t([-1.0, -1.0]), rejected=t([-2.0, -3.0]), ref_chosen=t([-1.5, -2.0]), ref_rejected=t([-2.5, -2.0])
)


def test_every_loss_is_registered_under_its_name_with_allowed_needs():
    expected = {
        "dpo", "robust_dpo", "ipo", "hinge", "simpo", "orpo", "cpo", "kto", "bco", "nca", "exo",
        "apo_zero", "apo_down", "aot", "sppo_hard", "rpo", "dpop", "lipo_lambda", "plackett_luce", "cpl",
    }  # fmt: skip
    assert expected <= set(PREFERENCE_LOSSES)
    assert "srpo" not in PREFERENCE_LOSSES  # see docs/preference.md: not derivable from our inputs
    for name in expected:
        fn = PREFERENCE_LOSSES[name]
        assert fn.name == name
        assert name in P.TRL_LOSS_TYPES
        # hyper-parameters are keyword-only; every docstring cites arXiv and states deviations
        assert all(
            p.default is inspect.Parameter.empty
            for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        )
        assert "arXiv:" in fn.__doc__ and "Deviations" in fn.__doc__


# ---------------------------------------------------------------------------------------------------------
# hand-computed values


def test_dpo_matches_hand_computed_values():
    # beta = 0.5: pair 0 beta*h = 0 -> sp(0) = 0.693147; pair 1 beta*h = 1 -> sp(1) = 0.313262
    close(P.dpo(**PAIRS, beta=0.5), [0.693147, 0.313262])


def test_conservative_dpo_label_smoothing():
    # eps = 0.1: pair 0: 0.9 log 2 + 0.1 log 2 = 0.693147
    #            pair 1: 0.9 sp(1) + 0.1 sp(-1) = 0.281936 + 0.131326 = 0.413262
    close(P.dpo(**PAIRS, beta=0.5, label_smoothing=0.1), [0.693147, 0.413262])


def test_robust_dpo_matches_hand_computed_values():
    # eps = 0.1: pair 0: (0.9 - 0.1) log 2 / 0.8 = 0.693147
    #            pair 1: (0.9 * 0.313262 - 0.1 * 1.313262) / 0.8 = (0.281936 - 0.131326) / 0.8 = 0.188262
    close(P.robust_dpo(**PAIRS, beta=0.5, epsilon=0.1), [0.693147, 0.188262])
    with pytest.raises(ValueError, match="epsilon"):
        P.robust_dpo(**PAIRS, epsilon=0.5)


def test_ipo_per_token_and_summed():
    lengths = dict(chosen_len=t([2.0, 4.0]), rejected_len=t([5.0, 1.0]))
    # tau = 0.25 -> target 1/(2 tau) = 2
    # summed (Eq. 17): pair 0 (0 - 2)^2 = 4; pair 1 (2 - 2)^2 = 0
    close(P.ipo(**PAIRS, **lengths, tau=0.25, length_normalized=False), [4.0, 0.0])
    # per token: pair 0 h = 0.5/2 - 0.5/5 = 0.15 -> (0.15 - 2)^2 = 3.4225
    #            pair 1 h = 1/4 - (-1)/1 = 1.25  -> (1.25 - 2)^2 = 0.5625
    close(P.ipo(**PAIRS, **lengths, tau=0.25), [3.4225, 0.5625])


def test_hinge_matches_hand_computed_values():
    # beta = 0.5: pair 0 relu(1 - 0) = 1; pair 1 relu(1 - 0.5 * 2) = 0
    close(P.hinge(**PAIRS, beta=0.5), [1.0, 0.0])
    # beta = 0.25: pair 1 relu(1 - 0.5) = 0.5
    close(P.hinge(**PAIRS, beta=0.25), [1.0, 0.5])


def test_simpo_matches_hand_computed_values():
    # beta 2, gamma 1. pair 0: 2 * (-4/2 - -6/3) - 1 = 2 * 0 - 1 = -1 -> sp(-1) = 1.313262
    #                  pair 1: 2 * (-2/4 - -9/3) - 1 = 2 * 2.5 - 1 = 4 -> sp(4) = log(1 + e^-4) = 0.018150
    loss = P.simpo(t([-4.0, -2.0]), t([-6.0, -9.0]), t([2.0, 4.0]), t([3.0, 3.0]), beta=2.0, gamma=1.0)
    close(loss, [1.313262, 0.018150])


def test_orpo_matches_hand_computed_values():
    # pair 0: |y_w| = 2, log pi(y_w) = 2 log 0.5 -> p_w = 0.5, odds 1
    #         |y_l| = 3, log pi(y_l) = 3 log 0.2 -> p_l = 0.2, odds 1/4
    #         log OR = log 4 -> sp(log 4) = log(1 + 1/4) = 0.223144; NLL = -log 0.5 = 0.693147
    #         loss = 0.693147 + 0.1 * 0.223144 = 0.715461
    # pair 1: p_w = 0.75 (odds 3, |y_w| = 1), p_l = 0.25 (odds 1/3, |y_l| = 4): log OR = log 9
    #         sp(log 9) = log(10/9) = 0.105361; NLL = -log 0.75 = 0.287682 -> 0.287682 + 0.010536 = 0.298218
    chosen = t([2 * math.log(0.5), math.log(0.75)])
    rejected = t([3 * math.log(0.2), 4 * math.log(0.25)])
    loss = P.orpo(chosen, rejected, t([2.0, 1.0]), t([3.0, 4.0]), lam=0.1)
    close(loss, [0.715461, 0.298218])


def test_cpo_matches_hand_computed_values():
    # beta 0.5, alpha 1. pair 0: sp(0.5 * 0) + 3/3 = 0.693147 + 1 = 1.693147
    #                    pair 1: sp(0.5 * 4) = log(1 + e^-2) = 0.126928, + 2/4 -> 0.626928
    loss = P.cpo(t([-3.0, -2.0]), t([-3.0, -6.0]), t([3.0, 4.0]), beta=0.5, alpha=1.0)
    close(loss, [1.693147, 0.626928])


UNPAIRED = dict(
    logps=t([-1.0, -1.0, -3.0, -3.0]),
    labels=torch.tensor([True, False, True, False]),
    ref_logps=t([-2.0, -2.0, -2.0, -2.0]),
)  # r = [1, 1, -1, -1]


def test_kto_matches_hand_computed_values():
    # z0 = 0.5, beta = 2, lam_d = 1, lam_u = 2
    # row 0 desirable   r = 1:  1 * (1 - sigmoid(2 * (1 - 0.5)))  = sigmoid(-1)     = 0.268941
    # row 1 undesirable r = 1:  2 * (1 - sigmoid(2 * (0.5 - 1)))  = 2 sigmoid(1)    = 1.462117
    # row 2 desirable   r = -1: 1 * (1 - sigmoid(2 * (-1.5)))     = sigmoid(3)      = 0.952574
    # row 3 undesirable r = -1: 2 * (1 - sigmoid(2 * 1.5))        = 2 sigmoid(-3)   = 0.094852
    loss = P.kto(**UNPAIRED, kl_ref_point=torch.tensor(0.5), beta=2.0, lam_d=1.0, lam_u=2.0)
    close(loss, [0.268941, 1.462117, 0.952574, 0.094852])


def test_bco_matches_hand_computed_values():
    # beta 1, reward_shift 0.5 (delta = 0.5): shifted = r - 0.5 = [0.5, 0.5, -1.5, -1.5]
    # desirable sp(shifted), undesirable sp(-shifted):
    #   sp(0.5) = 0.474077, sp(-0.5) = 0.974077, sp(-1.5) = 1.701413, sp(1.5) = 0.201413
    close(P.bco(**UNPAIRED, reward_shift=torch.tensor(0.5), beta=1.0), [0.474077, 0.974077, 1.701413, 0.201413])
    # beta 2, reward_shift 0.25 (delta = 0.5): shifted = 2 * (r - 0.25) = [1.5, 1.5, -2.5, -2.5]
    #   sp(1.5) = 0.201413, sp(-1.5) = 1.701413, sp(-2.5) = 2.578890, sp(2.5) = 0.078889
    close(P.bco(**UNPAIRED, reward_shift=torch.tensor(0.25), beta=2.0), [0.201413, 1.701413, 2.578890, 0.078889])


def test_nca_matches_hand_computed_values():
    # beta 1. pair 0 (r_w = r_l = 0.5): sp(0.5) + 0.5 sp(-0.5) + 0.5 sp(-0.5)
    #                                    = 0.474077 + 0.974077 = 1.448154
    #         pair 1 (r_w = 1, r_l = -1): sp(1) + 0.5 sp(-1) + 0.5 sp(1)
    #                                    = 0.313262 + 0.656631 + 0.156631 = 1.126524
    close(P.nca(**PAIRS, beta=1.0), [1.448154, 1.126524])


def test_exo_matches_hand_computed_values():
    # beta 0.5, eps 0.1 (p_w = 0.9, p_l = 0.1)
    # pair 0: q = 1/2 each: 0.5 (log 0.5 - log 0.9) + 0.5 (log 0.5 - log 0.1)
    #         = log 0.5 - 0.5 log 0.09 = 0.510826
    # pair 1: beta h = 1: q_w = 0.731059, log q_w = -0.313262; q_l = 0.268941, log q_l = -1.313262
    #         0.731059 (-0.313262 + 0.105361) + 0.268941 (-1.313262 + 2.302585)
    #         = -0.151988 + 0.266070 = 0.114082
    close(P.exo(**PAIRS, beta=0.5, epsilon=0.1), [0.510826, 0.114082])
    with pytest.raises(ValueError, match="epsilon"):
        P.exo(**PAIRS, epsilon=0.0)


def test_apo_zero_and_down_match_hand_computed_values():
    # beta 1. zero: pair 0: (1 - sigmoid(0.5)) + sigmoid(0.5) = 1
    #               pair 1: sigmoid(-1) + sigmoid(-1) = 0.537883
    close(P.apo_zero(**PAIRS, beta=1.0), [1.0, 0.537883])
    # down: pair 0: sigmoid(0.5) + 1 - sigmoid(0) = 0.622459 + 0.5 = 1.122459
    #       pair 1: sigmoid(1) + 1 - sigmoid(2) = 0.731059 + 0.119203 = 0.850261
    close(P.apo_down(**PAIRS, beta=1.0), [1.122459, 0.850261])


def test_aot_compares_sorted_margins_not_pairs():
    # policy margins chosen - rejected = [3, 0, 1] -> sorted [0, 1, 3]
    # reference margins                = [2, 1, -1] -> sorted [-1, 1, 2]
    # d = [1, 0, 1] -> beta 1: [sp(1), sp(0), sp(1)] = [0.313262, 0.693147, 0.313262]
    # (pair by pair the differences would be [1, -1, 2]: a different loss)
    loss = P.aot(t([0.0, 0.0, 0.0]), t([-3.0, 0.0, -1.0]), t([0.0, 0.0, 0.0]), t([-2.0, -1.0, 1.0]), beta=1.0)
    close(loss, [0.313262, 0.693147, 0.313262])


def test_sppo_hard_matches_hand_computed_values():
    # eta 2 -> eta/2 = 1. pair 0: (0.5 - 1)^2 + (0.5 + 1)^2 = 0.25 + 2.25 = 2.5
    #                     pair 1: (1 - 1)^2 + (-1 + 1)^2 = 0
    close(P.sppo_hard(**PAIRS, eta=2.0), [2.5, 0.0])


def test_rpo_is_dpo_plus_per_token_nll():
    # beta 0.5, alpha 1, |y_w| = [2, 4]: DPO [0.693147, 0.313262] + NLL [1/2, 1/4] = [1.193147, 0.563262]
    close(P.rpo(**PAIRS, chosen_len=t([2.0, 4.0]), beta=0.5, alpha=1.0), [1.193147, 0.563262])


def test_dpop_penalises_chosen_below_reference():
    # beta 0.5, lam 2. pairs 0, 1 have chosen above its reference -> penalty 0 -> DPO values
    # pair 2: chosen -3 < ref -2: penalty 1; r_w = -1, r_l = -5 - -2 = -3, h = 2; h - 2 * 1 = 0 -> log 2
    loss = P.dpop(
        t([-1.0, -1.0, -3.0]),
        t([-2.0, -3.0, -5.0]),
        t([-1.5, -2.0, -2.0]),
        t([-2.5, -2.0, -2.0]),
        beta=0.5,
        lam=2.0,
    )
    close(loss, [0.693147, 0.313262, 0.693147])


def test_lipo_lambda_matches_hand_computed_values():
    # beta 1, ref 0 -> s = [2, 0, 1]; psi = [1, 2, 0]
    # ranks by s: item 0 -> 1, item 2 -> 2, item 1 -> 3; 1/log2(1 + rank): 1, 1/2, 1/log2(3) = 0.630930
    # gains 2^psi - 1: [1, 3, 0]
    # (1 over 0): |3 - 1| |0.5 - 1| = 1        * sp(0 - 2) = 2.126928         -> 2.126928
    # (1 over 2): |3 - 0| |0.5 - 0.630930|     = 0.392789 * sp(0 - 1) = 1.313262 -> 0.515835
    # (0 over 2): |1 - 0| |1 - 0.630930|       = 0.369070 * sp(2 - 1) = 0.313262 -> 0.115616
    # total 2.758379
    loss = P.lipo_lambda(t([[2.0, 0.0, 1.0]]), t([[1.0, 2.0, 0.0]]), t([[0.0, 0.0, 0.0]]), beta=1.0)
    close(loss, [2.758379])


def test_lipo_lambda_with_two_completions_is_scaled_dpo():
    # K = 2, psi = [1, 0]: Delta = |1 - 0| * (1 - 1/log2 3) = 0.369070; s = beta*(r_w, r_l) with beta h = 1
    # -> 0.369070 * sp(1) = 0.115616 (a constant multiple of DPO's sp(beta h))
    loss = P.lipo_lambda(t([[-1.0, -3.0]]), t([[1.0, 0.0]]), t([[-2.0, -2.0]]), beta=0.5)
    close(loss, [0.115616])


def test_plackett_luce_matches_hand_computed_values():
    # beta 1, ref 0 -> u = [0, 1, 2]; scores [3, 1, 2] -> ranking item 0, item 2, item 1 -> u ranked [0, 2, 1]
    # step 1: log(e^0 + e^2 + e^1) - 0 = log(11.107338) = 2.407606
    # step 2: log(e^2 + e^1) - 2 = log(1 + e^-1) = 0.313262;  step 3: 0  -> 2.720868
    loss = P.plackett_luce(t([[0.0, 1.0, 2.0]]), t([[3.0, 1.0, 2.0]]), t([[0.0, 0.0, 0.0]]), beta=1.0)
    close(loss, [2.720868])
    # K = 2 is DPO: pair 1 (beta h = 1) -> sp(1) = 0.313262
    close(P.plackett_luce(t([[-1.0, -3.0]]), t([[1.0, 0.0]]), t([[-2.0, -2.0]]), beta=0.5), [0.313262])


# ---------------------------------------------------------------------------------------------------------
# edge cases


LENS = dict(chosen_len=t([4.0]), rejected_len=t([4.0]))


@pytest.mark.parametrize(
    ("name", "hyper", "expected"),
    [
        ("dpo", {}, math.log(2)),  # sp(0)
        ("robust_dpo", {}, math.log(2)),  # (0.9 - 0.1) log 2 / 0.8
        ("ipo", {"tau": 0.1}, 25.0),  # (0 - 1/0.2)^2
        ("hinge", {}, 1.0),  # relu(1 - 0)
        ("nca", {}, 2 * math.log(2)),  # sp(0) + 0.5 sp(0) + 0.5 sp(0)
        ("exo", {"epsilon": 1e-3}, 2.761231),  # log 0.5 - 0.5 log(0.999 * 0.001) = -0.693147 + 3.454378
        ("apo_zero", {}, 1.0),  # 0.5 + 0.5
        ("apo_down", {}, 1.0),  # 0.5 + 0.5
        ("sppo_hard", {"eta": 4.0}, 8.0),  # 2^2 + 2^2
        ("dpop", {}, math.log(2)),  # no penalty at chosen = ref
        ("aot", {}, math.log(2)),
        ("rpo", {}, math.log(2) + 0.5),  # sp(0) + 2/4
        ("simpo", {"gamma": 0.0}, math.log(2)),
        ("cpo", {"alpha": 0.0}, math.log(2)),
        ("orpo", {"lam": 1.0}, 0.5 + math.log(2)),  # NLL -(-2)/4 = 0.5; equal odds -> sp(0)
        ("cpl", {}, 0.744397),  # the bias: 0.1 * -2 - 0.5 * 0.1 * -2 = -0.1 -> sp(-0.1) = log(1 + e^0.1)
    ],
)
def test_equal_log_probs(name, hyper, expected):
    # chosen = rejected = ref = -2 (4 tokens each): every log-ratio and margin is 0
    inputs = dict(chosen=t([-2.0]), rejected=t([-2.0]), ref_chosen=t([-2.0]), ref_rejected=t([-2.0]), **LENS)
    close(call(PREFERENCE_LOSSES[name], inputs, **hyper), [expected])


PAIRED = ["dpo", "robust_dpo", "ipo", "hinge", "simpo", "orpo", "cpo", "nca", "exo", "apo_zero", "apo_down",
          "aot", "sppo_hard", "rpo", "dpop", "cpl"]  # fmt: skip


@pytest.mark.parametrize("name", PAIRED)
def test_extreme_margins_stay_finite(name):
    # beta 1 and h = +50, -50 (reference-free losses see margins of +-50 too); lengths 1
    chosen = t([-1.0, -51.0]).requires_grad_()
    rejected = t([-51.0, -1.0]).requires_grad_()
    inputs = dict(
        chosen=chosen,
        rejected=rejected,
        ref_chosen=t([-1.0, -1.0]),
        ref_rejected=t([-1.0, -1.0]),
        chosen_len=t([1.0, 1.0]),
        rejected_len=t([1.0, 1.0]),
    )
    hyper = {"ipo": {"tau": 1.0}, "sppo_hard": {"eta": 1.0}, "orpo": {"lam": 1.0}, "cpl": {"alpha": 1.0}}.get(
        name, {"beta": 1.0}
    )
    loss = call(PREFERENCE_LOSSES[name], inputs, **hyper)
    loss.sum().backward()
    assert (
        torch.isfinite(loss).all()
        and torch.isfinite(chosen.grad).all()
        and torch.isfinite(rejected.grad).all()
    )


def test_dpo_extreme_values():
    # h = 50: sp(50) = log(1 + e^-50) ~ 2e-22; h = -50: sp(-50) = 50 + log(1 + e^-50) = 50
    close(P.dpo(t([-1.0, -51.0]), t([-51.0, -1.0]), t([-1.0, -1.0]), t([-1.0, -1.0]), beta=1.0), [0.0, 50.0])


def test_orpo_saturated_probability_is_finite():
    # mean log-prob 0 (p = 1) would give infinite odds; clamped to -1e-6 the loss and gradient stay finite
    chosen = t([0.0]).requires_grad_()
    loss = P.orpo(chosen, t([-3.0]), t([3.0]), t([3.0]))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(chosen.grad).all()


def test_small_beta_is_log2_minus_half_the_margin():
    # sp(x) = log 2 - x/2 + O(x^2); beta 1e-6, h = 2: log 2 - 1e-6 = 0.6931462
    loss = P.dpo(**PAIRS, beta=1e-6)
    torch.testing.assert_close(loss[1], torch.tensor(math.log(2) - 1e-6), atol=1e-7, rtol=0)


def test_dpo_depends_only_on_log_ratios():
    # adding 7 to chosen and ref_chosen (and -3 to rejected and its reference) leaves every r unchanged
    shifted = dict(
        chosen=PAIRS["chosen"] + 7,
        rejected=PAIRS["rejected"] - 3,
        ref_chosen=PAIRS["ref_chosen"] + 7,
        ref_rejected=PAIRS["ref_rejected"] - 3,
    )
    torch.testing.assert_close(P.dpo(**shifted, beta=0.5), P.dpo(**PAIRS, beta=0.5))


def test_cpl_matches_hand_computed_values():
    # alpha 0.1, lam 0.5: chosen -2, rejected -6 -> 0.1 * -2 - 0.05 * -6 = 0.1 -> sp(0.1) = 0.644397
    #   with bc_coef 1 and lengths 2, 3: + (2 + 6) / 5 = 1.6 -> 2.244397
    # alpha 1, lam 1 (unbiased CPL = reference-free DPO with beta 1): chosen -1, rejected -3 -> sp(2) = 0.126928
    inputs = dict(chosen=t([-2.0]), rejected=t([-6.0]), chosen_len=t([2.0]), rejected_len=t([3.0]))
    close(P.cpl(**inputs), [0.644397])
    close(P.cpl(**inputs, bc_coef=1.0), [2.244397])
    close(P.cpl(t([-1.0]), t([-3.0]), t([1.0]), t([1.0]), alpha=1.0, lam=1.0), [0.126928])
    with pytest.raises(ValueError, match="lam=0"):
        P.cpl(**inputs, lam=0.0)


# ---------------------------------------------------------------------------------------------------------
# gradient direction


@pytest.mark.parametrize("name", PAIRED)
def test_gradient_raises_chosen_and_lowers_rejected(name):
    # r_w = 0.5, r_l = -0.5 (h = 1); lengths 4 and 5; every loss is below its optimum here
    chosen = t([-2.0]).requires_grad_()
    rejected = t([-3.0]).requires_grad_()
    inputs = dict(
        chosen=chosen,
        rejected=rejected,
        ref_chosen=t([-2.5]),
        ref_rejected=t([-2.5]),
        chosen_len=t([4.0]),
        rejected_len=t([5.0]),
    )
    call(PREFERENCE_LOSSES[name], inputs).sum().backward()
    assert rejected.grad.item() > 0
    if name != "apo_down":  # APO-down lowers the chosen likelihood by design
        assert chosen.grad.item() < 0


@pytest.mark.parametrize("name", ["kto", "bco"])
def test_unpaired_gradient_raises_desirable_and_lowers_undesirable(name):
    logps = UNPAIRED["logps"].clone().requires_grad_()
    inputs = dict(UNPAIRED, logps=logps, kl_ref_point=torch.tensor(0.2), reward_shift=torch.tensor(0.2))
    call(PREFERENCE_LOSSES[name], inputs).sum().backward()
    labels = UNPAIRED["labels"]
    assert (logps.grad[labels] < 0).all() and (logps.grad[~labels] > 0).all()


@pytest.mark.parametrize("name", ["lipo_lambda", "plackett_luce"])
def test_listwise_gradient_raises_best_and_lowers_worst(name):
    logps = t([[-3.0, -2.0, -1.0]]).requires_grad_()
    inputs = dict(logps_N_K=logps, scores_N_K=t([[2.0, 1.0, 0.0]]), ref_logps_N_K=t([[-2.0, -2.0, -2.0]]))
    call(PREFERENCE_LOSSES[name], inputs).sum().backward()
    assert logps.grad[0, 0] < 0 and logps.grad[0, 2] > 0


# ---------------------------------------------------------------------------------------------------------
# TRL 1.16 formulas, transcribed from its source with a pointer to the file and line (the lines of the
# trl==1.16.0 wheel). Where TRL is installed, `test_trl_116_has_what_the_transcriptions_name` and the ORPO
# test below check the transcriptions against TRL's own code.

# TRL 1.16's preference trainers (trl/__init__.py, trl/experimental/) and the loss types each accepts:
# DPO trl/trainer/dpo_config.py:245 (loss_type help), KTO trl/trainer/kto_config.py:198 (choices),
# CPO trl/experimental/cpo/cpo_trainer.py:715-737 (cpo_loss); ORPO has one loss and no loss_type.
TRL_116_TRAINERS: dict[str, set[str | None]] = {
    "trl.DPOTrainer": {
        "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
        "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
    },
    "trl.KTOTrainer": {"kto", "apo_zero_unpaired"},
    "trl.experimental.cpo.CPOTrainer": {"sigmoid", "hinge", "ipo", "simpo"},
    "trl.experimental.orpo.ORPOTrainer": {None},
}  # fmt: skip


def test_trl_loss_types_name_only_what_trl_116_has():
    # XPO, Nash-MD and BCO trainers are not in TRL 1.16; a loss mapped to TRL names a trainer and loss types it has
    assert set(P.TRL_LOSS_TYPES) == set(PREFERENCE_LOSSES)
    for name, target in P.TRL_LOSS_TYPES.items():
        if target is None:
            continue
        trainer, loss_type = target
        assert trainer in TRL_116_TRAINERS, (name, trainer)
        for part in loss_type.split("+") if loss_type else [None]:
            assert part in TRL_116_TRAINERS[trainer], (name, part)


def test_trl_116_has_what_the_transcriptions_name():
    import importlib
    import re

    trl = pytest.importorskip("trl")
    if trl.__version__ != "1.16.0":
        pytest.skip(f"the transcriptions are of TRL 1.16.0, not {trl.__version__}")
    assert not hasattr(trl, "XPOTrainer") and not hasattr(trl, "NashMDTrainer") and not hasattr(trl, "BCOTrainer")
    for path, loss_types in TRL_116_TRAINERS.items():
        module, cls = path.rsplit(".", 1)
        config = getattr(importlib.import_module(module), cls.replace("Trainer", "Config"))
        field = config.__dataclass_fields__.get("loss_type")
        if loss_types == {None}:
            assert field is None, path
            continue
        named = set(field.metadata.get("choices") or re.findall(r"`'(\w+)'`", field.metadata["help"]))
        assert named - {"alphapo"} == loss_types, path  # CPOConfig turns alphapo into simpo with cpo_alpha=0


def test_the_docs_trl_column_is_trl_loss_types():
    from pathlib import Path

    table = Path(__file__).parents[2] / "docs" / "preference.md"
    rows = {}
    for line in table.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`") and cells[0].strip("`") in PREFERENCE_LOSSES:
            rows[cells[0].strip("`")] = cells[3]
    assert set(rows) == set(PREFERENCE_LOSSES)
    for name, target in P.TRL_LOSS_TYPES.items():
        if target is None:
            assert rows[name].startswith("none"), name
            continue
        trainer, loss_type = target
        assert f"`{trainer.rsplit('.', 1)[1]}`" in rows[name], name
        for part in loss_type.split("+") if loss_type else []:
            assert part in rows[name], (name, part)


def random_pairs(n: int = 6, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: -torch.rand(n, generator=g) * 20 for k in ("chosen", "rejected", "ref_chosen", "ref_rejected")}


def test_matches_trl_dpo_family():
    x = random_pairs()
    beta, ls = 0.3, 0.2
    chosen_logratios = x["chosen"] - x["ref_chosen"]
    rejected_logratios = x["rejected"] - x["ref_rejected"]
    delta_score = chosen_logratios - rejected_logratios
    trl = {  # trl/trainer/dpo_trainer.py:1387-1482 (_compute_loss), f_divergence_type="reverse_kl"
        "dpo": -F.logsigmoid(beta * delta_score),  # "sigmoid"
        "hinge": torch.relu(1 - beta * delta_score),
        "robust_dpo": (-(1 - ls) * F.logsigmoid(beta * delta_score) + ls * F.logsigmoid(-beta * delta_score))
        / (1 - 2 * ls),
        "nca": -F.logsigmoid(beta * chosen_logratios)
        - 0.5 * F.logsigmoid(-beta * chosen_logratios)
        - 0.5 * F.logsigmoid(-beta * rejected_logratios),
        "apo_zero": 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios),
        "apo_down": torch.sigmoid(beta * chosen_logratios) + 1 - torch.sigmoid(beta * delta_score),
    }
    ours = {
        "dpo": P.dpo(**x, beta=beta),
        "hinge": P.hinge(**x, beta=beta),
        "robust_dpo": P.robust_dpo(**x, beta=beta, epsilon=ls),
        "nca": P.nca(**x, beta=beta),
        "apo_zero": P.apo_zero(**x, beta=beta),
        "apo_down": P.apo_down(**x, beta=beta),
    }
    for name in trl:
        torch.testing.assert_close(ours[name], trl[name], msg=name)


def test_matches_trl_exo_pair():
    x = random_pairs(seed=1)
    beta, eps = 0.2, 1e-3
    delta_score = (x["chosen"] - x["ref_chosen"]) - (x["rejected"] - x["ref_rejected"])
    epsilon = torch.tensor(eps)  # trl/trainer/dpo_trainer.py:1406-1417, epsilon = label_smoothing
    qw, log_qw = torch.sigmoid(beta * delta_score), F.logsigmoid(beta * delta_score)
    ql, log_ql = torch.sigmoid(-beta * delta_score), F.logsigmoid(-beta * delta_score)
    trl = qw * (log_qw - torch.log1p(-epsilon)) + ql * (log_ql - torch.log(epsilon))
    torch.testing.assert_close(P.exo(**x, beta=beta, epsilon=eps), trl)


def test_matches_trl_ipo_with_completion_masks():
    x = random_pairs(n=3, seed=2)
    beta = 0.1
    chosen_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    rejected_mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    # trl/trainer/dpo_trainer.py:1393-1404: scores averaged over each completion's tokens, beta = tau
    chosen_avg = (x["chosen"] - x["ref_chosen"]) / chosen_mask.sum(dim=1).clamp(min=1.0)
    rejected_avg = (x["rejected"] - x["ref_rejected"]) / rejected_mask.sum(dim=1).clamp(min=1.0)
    trl = (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2
    ours = P.ipo(
        **x, chosen_len=chosen_mask.sum(1).float(), rejected_len=rejected_mask.sum(1).float(), tau=beta
    )
    torch.testing.assert_close(ours, trl)


def test_matches_trl_bco_pair_summed_over_both_rows():
    x = random_pairs(seed=3)
    beta = 0.4
    chosen_rewards = beta * (x["chosen"] - x["ref_chosen"])  # trl/trainer/dpo_trainer.py:1433-1436
    rejected_rewards = beta * (x["rejected"] - x["ref_rejected"])
    trl = -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)
    n = len(trl)
    ours = P.bco(
        torch.cat([x["chosen"], x["rejected"]]),
        torch.arange(2 * n) < n,
        torch.cat([x["ref_chosen"], x["ref_rejected"]]),
        torch.tensor(0.0),
        beta=beta,
    )
    torch.testing.assert_close(ours[:n] + ours[n:], trl)


def test_matches_trl_sppo_hard_with_beta_one_over_eta():
    x = random_pairs(seed=4)
    beta = 0.5  # TRL's beta; eta = 1 / beta; trl/trainer/dpo_trainer.py:1438-1445
    trl = (x["chosen"] - x["ref_chosen"] - 0.5 / beta) ** 2 + (
        x["rejected"] - x["ref_rejected"] + 0.5 / beta
    ) ** 2
    torch.testing.assert_close(P.sppo_hard(**x, eta=1 / beta), trl)


def test_matches_trl_aot_paired():
    x = random_pairs(seed=5)
    beta, ls = 0.1, 0.1
    logratios_sorted, _ = torch.sort(x["chosen"] - x["rejected"], dim=0)  # trl/trainer/dpo_trainer.py:1447-1456
    ref_logratios_sorted, _ = torch.sort(x["ref_chosen"] - x["ref_rejected"], dim=0)
    delta = logratios_sorted - ref_logratios_sorted
    trl = -F.logsigmoid(beta * delta) * (1 - ls) - F.logsigmoid(-beta * delta) * ls
    torch.testing.assert_close(P.aot(**x, beta=beta, label_smoothing=ls), trl)


def test_matches_trl_rpo_as_sigmoid_plus_sft_with_equal_lengths():
    # TRL 1.16: loss_type=["sigmoid", "sft"], loss_weights=[1, alpha]; "sft" (trl/trainer/dpo_trainer.py:1495-1502)
    # is -mean of the chosen completion's per-token log-probs over the batch (a scalar; shift_completion_mask
    # holds completion tokens only); per pair the same when all chosen lengths are equal.
    g = torch.Generator().manual_seed(6)
    per_token_chosen = -torch.rand(4, 5, generator=g) * 3  # [N, T], all tokens are completion tokens
    x = random_pairs(n=4, seed=7)
    x["chosen"] = per_token_chosen.sum(1)
    beta, alpha = 0.1, 0.7
    delta_score = (x["chosen"] - x["ref_chosen"]) - (x["rejected"] - x["ref_rejected"])
    trl_mean = (-F.logsigmoid(beta * delta_score)).mean() + alpha * -per_token_chosen.mean()
    ours = P.rpo(**x, chosen_len=torch.full((4,), 5.0), beta=beta, alpha=alpha)
    torch.testing.assert_close(ours.mean(), trl_mean)


def test_matches_trl_cpo_and_simpo():
    g = torch.Generator().manual_seed(8)
    per_token_chosen = -torch.rand(4, 5, generator=g) * 3
    rejected = -torch.rand(4, generator=g) * 15
    chosen = per_token_chosen.sum(1)
    chosen_len, rejected_len = torch.full((4,), 5.0), t([3.0, 7.0, 1.0, 4.0])
    beta, cpo_alpha, simpo_gamma = 0.2, 1.0, 0.5
    # CPOTrainer, loss_type="sigmoid" (summed log-probs), label_smoothing=0, + cpo_alpha * token-mean NLL over the
    # chosen completion tokens of the batch (trl/experimental/cpo/cpo_trainer.py:723-728, 840-845, 890)
    logits = chosen - rejected
    trl_cpo = (-F.logsigmoid(beta * logits)).mean() + cpo_alpha * -per_token_chosen.mean()
    torch.testing.assert_close(
        P.cpo(chosen, rejected, chosen_len, beta=beta, alpha=cpo_alpha).mean(), trl_cpo
    )
    # CPOTrainer, loss_type="simpo" (average_log_prob=True), cpo_alpha=0 (cpo_trainer.py:715-722)
    logits = chosen / chosen_len - rejected / rejected_len - simpo_gamma / beta
    trl_simpo = -F.logsigmoid(beta * logits)
    torch.testing.assert_close(
        P.simpo(chosen, rejected, chosen_len, rejected_len, beta=beta, gamma=simpo_gamma), trl_simpo
    )


def orpo_batch(seed: int = 9) -> tuple[Tensor, dict[str, Tensor]]:
    """Logits [2N, T, V] and a batch in TRL's ORPO format: prompt + completion ids right-padded with 0,
    attention masks, and labels holding the completion ids only (-100 on prompt and padding). Chosen
    completions all have 3 tokens, so TRL's batch token mean of the chosen NLL would equal ours per pair
    if it left the prompt out; prompts have 4, 2 and 5 tokens."""
    g = torch.Generator().manual_seed(seed)
    prompts, chosen, rejected = [4, 2, 5], [3, 3, 3], [2, 5, 1]
    t_len, vocab = 9, 7
    batch: dict[str, Tensor] = {}
    for side, lengths in (("chosen", chosen), ("rejected", rejected)):
        ids = torch.zeros(3, t_len, dtype=torch.long)
        mask = torch.zeros(3, t_len, dtype=torch.long)
        labels = torch.full((3, t_len), -100)
        for i, (p, c) in enumerate(zip(prompts, lengths)):
            ids[i, : p + c] = torch.randint(1, vocab, (p + c,), generator=g)
            mask[i, : p + c] = 1
            labels[i, p : p + c] = ids[i, p : p + c]
        batch |= {f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels}
    return torch.randn(6, t_len, vocab, generator=g) * 2, batch


def trl_orpo_loss(logits: Tensor, batch: dict[str, Tensor], beta: float) -> tuple[Tensor, Tensor]:
    """TRL 1.16's ORPO loss and its NLL term, transcribed from trl/experimental/orpo/orpo_trainer.py:
    concatenated_forward (779-800: cross_entropy_loss over labels = input_ids where attention_mask == 1,
    i.e. prompt AND chosen; 802-807: get_batch_logps with average_log_prob=True over the completion labels),
    odds_ratio_loss (691-697), log1mexp (87-91) and get_batch_loss_metrics (848: nll - losses.mean())."""
    n, vocab = batch["chosen_input_ids"].shape[0], logits.shape[-1]
    full_labels = torch.where(batch["chosen_attention_mask"] == 1, batch["chosen_input_ids"], -100)
    nll = F.cross_entropy(logits[:n, :-1].reshape(-1, vocab), full_labels[:, 1:].reshape(-1))  # ignores -100
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])[:, 1:]
    mask = labels != -100
    per_token = torch.gather(logits[:, :-1].log_softmax(-1), 2, labels.clamp(min=0)[..., None]).squeeze(-1)
    mean_logps = (per_token * mask).sum(-1) / mask.sum(-1)
    chosen, rejected = mean_logps[:n], mean_logps[n:]

    def log1mexp(x):
        return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))

    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return nll - (beta * F.logsigmoid(log_odds)).mean(), nll


def ours_from_logits(logits: Tensor, batch: dict[str, Tensor], lam: float) -> tuple[Tensor, Tensor]:
    """P.orpo on the summed completion log-probs the loop would hand it, and our NLL term (per-pair mean)."""
    n = batch["chosen_input_ids"].shape[0]
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])[:, 1:]
    mask = labels != -100
    per_token = torch.gather(logits[:, :-1].log_softmax(-1), 2, labels.clamp(min=0)[..., None]).squeeze(-1)
    sums, lengths = (per_token * mask).sum(-1), mask.sum(-1).float()
    loss = P.orpo(sums[:n], sums[n:], lengths[:n], lengths[n:], lam=lam).mean()
    return loss, (-sums[:n] / lengths[:n]).mean()


def test_orpo_odds_ratio_term_is_trls_and_the_nll_term_leaves_the_prompt_out():
    logits, batch = orpo_batch()
    beta = 0.1  # TRL's beta = ORPO's lambda
    trl_loss, trl_nll = trl_orpo_loss(logits, batch, beta)
    ours, our_nll = ours_from_logits(logits, batch, beta)
    # the odds-ratio terms are equal: the two losses differ by their NLL terms only
    torch.testing.assert_close(ours - our_nll, trl_loss - trl_nll)
    # TRL's NLL is the token mean over prompt + chosen (every token after the first: 3 + 1 + 4 prompt positions,
    # 9 chosen ones); ours the chosen tokens' (here all chosen lengths are 3, so the per-pair mean is the batch's)
    n_prompt, n_chosen = 3 + 1 + 4, 9
    log_probs = logits[:3, :-1].log_softmax(-1)
    targets = batch["chosen_input_ids"][:, 1:]
    token_nll = -torch.gather(log_probs, 2, targets[..., None]).squeeze(-1)  # [3, T-1]
    prompt_positions = torch.zeros_like(token_nll, dtype=torch.bool)
    for i, p in enumerate([4, 2, 5]):
        prompt_positions[i, : p - 1] = True
    prompt_nll = token_nll[prompt_positions].sum() / n_prompt
    torch.testing.assert_close(trl_nll, (n_prompt * prompt_nll + n_chosen * our_nll) / (n_prompt + n_chosen))
    assert abs(trl_nll - our_nll) > 0.05  # equal chosen lengths do not make them equal


def test_orpo_transcription_is_trls_own_code():
    from types import SimpleNamespace

    pytest.importorskip("trl")
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    logits, batch = orpo_batch(seed=11)
    beta = 0.3
    trainer = orpo.ORPOTrainer
    fake = SimpleNamespace(  # the attributes concatenated_forward and odds_ratio_loss read
        concatenated_inputs=trainer.concatenated_inputs,
        get_batch_logps=trainer.get_batch_logps,
        is_encoder_decoder=False,
        padding_value=0,
        aux_loss_enabled=False,
        accelerator=SimpleNamespace(device="cpu"),
        beta=beta,
    )
    model = lambda ids, attention_mask, use_cache: SimpleNamespace(logits=logits)
    chosen, rejected, _, _, nll = trainer.concatenated_forward(fake, model, batch)
    losses = trainer.odds_ratio_loss(fake, chosen, rejected)[0]
    trl_loss, trl_nll = trl_orpo_loss(logits, batch, beta)
    torch.testing.assert_close(nll, trl_nll)
    torch.testing.assert_close(nll - losses.mean(), trl_loss)  # orpo_trainer.py:848


def test_matches_trl_kto():
    g = torch.Generator().manual_seed(10)
    logps, ref_logps = -torch.rand(7, generator=g) * 10, -torch.rand(7, generator=g) * 10
    labels = torch.tensor([True, False, False, True, True, False, True])
    kl = torch.tensor(0.3)
    beta, desirable_weight, undesirable_weight = 0.5, 1.0, 1.5
    # trl/trainer/kto_trainer.py:1449-1482 (kl: 1443-1444, the mean over the mismatched pairs, clamped at 0)
    chosen_logratios = logps[labels] - ref_logps[labels]
    rejected_logratios = logps[~labels] - ref_logps[~labels]
    chosen_losses = 1 - F.sigmoid(beta * (chosen_logratios - kl))
    rejected_losses = 1 - F.sigmoid(beta * (kl - rejected_logratios))
    trl = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    ours = P.kto(logps, labels, ref_logps, kl, beta=beta, lam_d=desirable_weight, lam_u=undesirable_weight)
    torch.testing.assert_close(torch.cat([ours[labels], ours[~labels]]), trl)
