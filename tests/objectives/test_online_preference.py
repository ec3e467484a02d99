"""Losses for a policy's own samples (SPPO, XPO, Nash-MD, NLL) against hand-computed values, their
edge cases and the sign of their gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.objectives import online_preference as O
from posttrain.objectives import preference as P
from posttrain.objectives.registry import PREFERENCE_LOSSES


def t(values) -> Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(actual: Tensor, expected: list[float], atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, t(expected), atol=atol, rtol=0)


def test_registered_with_what_the_loop_must_supply():
    assert set(PREFERENCE_LOSSES["sppo"].needs) == {"listwise", "reference", "win_rates"}
    assert set(PREFERENCE_LOSSES["xpo"].needs) == {"reference", "reference_samples"}
    assert set(PREFERENCE_LOSSES["nash_md"].needs) == {"listwise", "reference", "win_rates", "mixture_opponents"}
    assert set(PREFERENCE_LOSSES["nll"].needs) == {"unpaired", "lengths"}
    # what they consume and how an online round samples their opponents
    assert [PREFERENCE_LOSSES[n].consumes for n in ("sppo", "xpo", "nash_md", "nll")] == [
        "lists", "pairs", "lists", "unpaired"]
    assert [PREFERENCE_LOSSES[n].opponents for n in ("sppo", "xpo", "nash_md", "nll")] == [
        None, "reference", "mixture", None]
    for name in ("sppo", "xpo", "nash_md", "nll"):
        doc = PREFERENCE_LOSSES[name].__doc__
        assert "arXiv:" in doc and "Deviations" in doc
        assert name in P.TRL_LOSS_TYPES


def test_sppo_matches_hand_computed_values():
    # row 0: r = (-1 - -1.5, -2 - -1.5) = (0.5, -0.5); eta 2, win rates (1, 0) -> targets (1, -1)
    #        (0.5 - 1)^2 + (-0.5 + 1)^2 = 0.25 + 0.25 = 0.5
    # row 1: r = (0, 0); win rates (0.75, 0.25) -> targets (0.5, -0.5) -> 0.25 + 0.25 = 0.5
    logps, ref_logps = t([[-1.0, -2.0], [-1.0, -1.0]]), t([[-1.5, -1.5], [-1.0, -1.0]])
    loss = O.sppo(logps, ref_logps, t([[1.0, 0.0], [0.75, 0.25]]), eta=2.0)
    close(loss, [0.5, 0.5])
    # a sample that wins half its games is held at its reference likelihood: loss 0 at r = 0
    close(O.sppo(t([[-3.0]]), t([[-3.0]]), t([[0.5]])), [0.0])


def test_sppo_with_hard_win_rates_is_sppo_hard():
    g = torch.Generator().manual_seed(0)
    chosen, rejected, ref_c, ref_r = (torch.randn(5, generator=g) for _ in range(4))
    listwise = O.sppo(
        torch.stack([chosen, rejected], 1), torch.stack([ref_c, ref_r], 1), t([[1.0, 0.0]] * 5), eta=3.0
    )
    torch.testing.assert_close(listwise, P.sppo_hard(chosen, rejected, ref_c, ref_r, eta=3.0))


def test_sppo_gradient_raises_winners_and_lowers_losers():
    logps = t([[-2.0, -2.0]]).requires_grad_()
    O.sppo(logps, t([[-2.0, -2.0]]), t([[1.0, 0.0]]), eta=1.0).sum().backward()
    assert logps.grad[0, 0] < 0 < logps.grad[0, 1]


PAIRS = dict(
    chosen=t([-1.0, -1.0]), rejected=t([-2.0, -3.0]), ref_chosen=t([-1.5, -2.0]), ref_rejected=t([-2.5, -2.0])
)  # h = 0 and h = 2


def test_xpo_is_dpo_plus_the_reference_samples_log_likelihood():
    # beta 0.5: DPO terms sp(0) = 0.693147 and sp(1) = 0.313262
    # pair 0's chosen (-1) and pair 1's rejected (-3) were sampled by the reference; alpha 0.1:
    #   0.693147 + 0.1 * -1 = 0.593147;  0.313262 + 0.1 * -3 = 0.013262
    from_ref_c, from_ref_r = torch.tensor([True, False]), torch.tensor([False, True])
    close(O.xpo(**PAIRS, chosen_from_reference=from_ref_c, rejected_from_reference=from_ref_r, beta=0.5, alpha=0.1),
          [0.593147, 0.013262])
    # alpha 0 is DPO
    torch.testing.assert_close(
        O.xpo(**PAIRS, chosen_from_reference=from_ref_c, rejected_from_reference=from_ref_r, beta=0.5, alpha=0.0),
        P.dpo(**PAIRS, beta=0.5),
    )


def test_xpo_bonus_lowers_a_reference_sample_the_pair_prefers():
    # With beta 0 the DPO term has no gradient: only the bonus acts, d/d chosen = alpha > 0 (lowered).
    chosen = t([-1.0]).requires_grad_()
    O.xpo(chosen, t([-2.0]), t([-1.0]), t([-2.0]), torch.tensor([True]), torch.tensor([False]), beta=0.0, alpha=0.5
          ).sum().backward()
    assert chosen.grad.item() == 0.5


def test_selm_is_dpo_plus_alpha_beta_times_the_reference_samples_implicit_reward():
    # beta 0.5: DPO terms sp(0) = 0.693147 and sp(1) = 0.313262
    # pair 0's chosen (r_w = 0.5) and pair 1's rejected (r_l = -1) were sampled by the reference; alpha 0.1:
    #   0.693147 + 0.1 * 0.5 * 0.5 = 0.718147;  0.313262 + 0.1 * 0.5 * -1 = 0.263262
    from_ref_c, from_ref_r = torch.tensor([True, False]), torch.tensor([False, True])
    flags = dict(chosen_from_reference=from_ref_c, rejected_from_reference=from_ref_r)
    close(O.selm(**PAIRS, **flags, beta=0.5, alpha=0.1), [0.718147, 0.263262])
    assert PREFERENCE_LOSSES["selm"].opponents == "reference" and PREFERENCE_LOSSES["selm"].consumes == "pairs"
    # the reference log-prob carries no gradient: the gradient is XPO's with alpha * beta as its alpha
    grads = []
    for fn, alpha in ((O.selm, 0.1), (O.xpo, 0.05)):
        chosen = PAIRS["chosen"].clone().requires_grad_()
        fn(**{**PAIRS, "chosen": chosen}, **flags, beta=0.5, alpha=alpha).sum().backward()
        grads.append(chosen.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_nash_md_matches_hand_computed_values_and_gradient():
    # log-ratios (1, -1); beta 0.5; win rates (1, 0.5):
    #   k0: 0.5 * 1 * -1 - (1 - 0.5) * -1 = -0.5 + 0.5 = 0
    #   k1: 0.5 * -1 * -2 - 0 * -2       = 1
    #   mean 0.5
    logps = t([[-1.0, -2.0]]).requires_grad_()
    loss = O.nash_md(logps, t([[-2.0, -1.0]]), t([[1.0, 0.5]]), beta=0.5)
    close(loss, [0.5])
    # d/d logp_k = (beta * log-ratio_k - (p_k - 1/2)) / K: k0 (0.5 - 0.5) / 2 = 0; k1 (-0.5 - 0) / 2 = -0.25
    loss.sum().backward()
    close(logps.grad, [[0.0, -0.25]])


def test_nash_md_at_the_reference_pushes_winners_up_and_losers_down():
    logps = t([[-1.0, -1.0]]).requires_grad_()
    O.nash_md(logps, t([[-1.0, -1.0]]), t([[1.0, 0.0]]), beta=0.1).sum().backward()
    # log-ratio 0: gradient -(p - 1/2) / K = (-0.25, 0.25)
    close(logps.grad, [[-0.25, 0.25]])


def test_nll_trains_on_desirable_completions_only():
    # -(-2) / 4 = 0.5 for the desirable one; 0 for the other
    close(O.nll(t([-2.0, -3.0]), torch.tensor([True, False]), t([4.0, 1.0])), [0.5, 0.0])
    logps = t([-2.0, -3.0]).requires_grad_()
    O.nll(logps, torch.tensor([True, False]), t([4.0, 1.0])).sum().backward()
    close(logps.grad, [-0.25, 0.0])
