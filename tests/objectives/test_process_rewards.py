"""Process-reward objectives against hand-computed values: the PRM's per-step loss, the implicit PRM's
cross-entropy and its token, step and Q values, the Clip and Delta refinements, PRIME's advantage.

sp(x) = -log sigmoid(x) = log(1 + e^-x); sp(0) = log 2 = 0.693147, sp(1) = 0.313262, sp(-1) = 1.313262,
sp(-2) = log(1 + e^2) = 2.126928.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from posttrain.objectives.process_rewards import (
    clip_step_rewards,
    delta_step_rewards,
    implicit_prm,
    implicit_token_rewards,
    prime,
    process_bce,
    step_rewards_from_tokens,
    step_values,
)
from posttrain.objectives.registry import ADVANTAGES, PREFERENCE_LOSSES, REWARD_MODEL_LOSSES


def t(values) -> Tensor:
    return torch.tensor(values, dtype=torch.float32)


def b(values) -> Tensor:
    return torch.tensor(values, dtype=torch.bool)


def close(actual: Tensor, expected, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, t(expected), atol=atol, rtol=0)


def test_registered_names_needs_and_data_kinds():
    assert REWARD_MODEL_LOSSES["process_bce"] is process_bce
    assert process_bce.needs == ("stepwise",) and process_bce.consumes == "steps"
    assert PREFERENCE_LOSSES["implicit_prm"] is implicit_prm
    assert implicit_prm.needs == ("reference", "unpaired") and implicit_prm.consumes == "unpaired"
    assert ADVANTAGES["prime"] is prime and prime.needs == ("groups", "process_rewards")


def test_process_bce_is_the_binary_cross_entropy_of_each_step():
    # step 0: logit 0, right -> sp(0) = 0.693147; step 1: logit 2, wrong -> sp(-2) = 2.126928
    close(process_bce(t([0.0, 2.0]), b([True, False])), [0.693147, 2.126928])


def test_process_bce_gradient_raises_the_logit_of_a_right_step_and_lowers_a_wrong_one():
    logits = t([0.5, 0.5]).requires_grad_()
    process_bce(logits, b([True, False])).sum().backward()
    # d/dl = sigmoid(l) - y: sigmoid(0.5) - 1 < 0 for the right step, sigmoid(0.5) > 0 for the wrong one
    assert logits.grad[0] < 0 < logits.grad[1]


def test_implicit_prm_is_cross_entropy_on_the_scaled_log_ratio():
    # beta 0.5: r = 0.5 * (logp - ref)
    # row 0: r = 0.5 * (-1 + 3) = 1, right -> sp(1) = 0.313262
    # row 1: r = 0.5 * (-2 + 2) = 0, wrong -> sp(0) = 0.693147
    # row 2: r = 0.5 * (-1 + 3) = 1, wrong -> sp(-1) = 1.313262
    loss = implicit_prm(t([-1.0, -2.0, -1.0]), b([True, False, False]), t([-3.0, -2.0, -3.0]), beta=0.5)
    close(loss, [0.313262, 0.693147, 1.313262])


def test_implicit_prm_gradient_raises_a_right_completion_and_lowers_a_wrong_one():
    logps = t([-2.0, -2.0]).requires_grad_()
    implicit_prm(logps, b([True, False]), t([-2.0, -2.0])).sum().backward()
    assert logps.grad[0] < 0 < logps.grad[1]


def test_implicit_token_rewards_are_the_scaled_log_ratio_at_completion_tokens():
    # beta 0.1: [0.1 * (-1 + 2), 0.1 * (-2 + 2), masked] = [0.1, 0, 0]
    rewards = implicit_token_rewards(t([[-1.0, -2.0, 5.0]]), t([[-2.0, -2.0, 0.0]]), b([[True, True, False]]),
                                     beta=0.1)  # fmt: skip
    close(rewards, [[0.1, 0.0, 0.0]])


def test_step_values_and_rewards_from_token_rewards():
    # tokens 1 2 3 4 5, steps end at tokens 1 and 4 (0-based): q = [3, 15]; r = [3, 15 - 3] = [3, 12]
    tokens, ends = t([[1.0, 2.0, 3.0, 4.0, 5.0]]), b([[False, True, False, False, True]])
    close(step_values(tokens, ends), [[0.0, 3.0, 0.0, 0.0, 15.0]])
    rewards = step_rewards_from_tokens(tokens, ends)
    close(rewards, [[0.0, 3.0, 0.0, 0.0, 12.0]])
    # the step rewards sum to the outcome reward (the sum of the token rewards)
    assert rewards.sum().item() == pytest.approx(15.0)


def test_clip_makes_every_step_reward_non_positive():
    # eta 0.5: min(0.9 - 0.5, 0) = 0; min(0.3 - 0.5, 0) = -0.2; off step ends: 0
    scores, ends = t([[0.9, 7.0, 0.3]]), b([[True, False, True]])
    close(clip_step_rewards(scores, ends, eta=0.5), [[0.0, 0.0, -0.2]])


def test_delta_rewards_telescope_to_the_first_minus_the_last_score():
    # row 0: every token ends a step, scores 0.7 0.2 0.4 0.8 -> 0.7-0.2, 0.2-0.4, 0.4-0.8, 0 = 0.5 -0.2 -0.4 0
    # row 1: steps end at tokens 1 and 3, scores 0.6 and 0.9 -> 0.6 - 0.9 = -0.3 at token 1, 0 at token 3
    scores = t([[0.7, 0.2, 0.4, 0.8], [5.0, 0.6, 5.0, 0.9]])
    ends = b([[True, True, True, True], [False, True, False, True]])
    delta = delta_step_rewards(scores, ends)
    close(delta, [[0.5, -0.2, -0.4, 0.0], [0.0, -0.3, 0.0, 0.0]])
    # the return from the first step is r_1 - r_K, however many steps a completion repeats
    assert delta[0].sum().item() == pytest.approx(0.7 - 0.8)


def test_prime_leaves_one_out_on_each_reward_source_then_sums_returns():
    # G = 2, outcomes [1, 0]; process rewards [[0.2, 0.4], [0.1, 0.3]]; coefficients 1, no whitening
    # process means 0.3, 0.2 -> baseline (0.3 + 0.2) / (G - 1) = 0.5 for both
    # process: r * 2 - 0.5 -> [[-0.1, 0.3], [-0.3, 0.1]]
    # outcome RLOO at the last token: 1 - 0 = 1, 0 - 1 = -1
    # totals [[-0.1, 1.3], [-0.3, -0.9]] -> returns (reverse cumsum) [[1.2, 1.3], [-1.2, -0.9]]
    process, mask = t([[0.2, 0.4], [0.1, 0.3]]), b([[True, True], [True, True]])
    adv = prime(t([1.0, 0.0]), process, mask, group_size=2, outcome_coef=1.0, process_coef=1.0, whiten=False)
    close(adv, [[1.2, 1.3], [-1.2, -0.9]])
    # the default coefficients 5 scale the returns by 5
    close(prime(t([1.0, 0.0]), process, mask, group_size=2, whiten=False), [[6.0, 6.5], [-6.0, -4.5]])
    # whitened: mean 0.1, centred [1.1, 1.2, -1.3, -1.0], biased variance 5.34 / 4 = 1.335
    close(prime(t([1.0, 0.0]), process, mask, group_size=2), [[0.952033, 1.038582], [-1.125130, -0.865485]])


def test_prime_outcome_sits_on_the_last_completion_token_and_padding_stays_zero():
    # row 1 has one completion token: its outcome -1 lands on token 0, its padding holds 0
    # process rewards 0: totals [[0, 1], [-1, pad]] -> returns [[1, 1], [-1, 0]]
    mask = b([[True, True], [True, False]])
    adv = prime(t([1.0, 0.0]), torch.zeros(2, 2), mask, group_size=2, outcome_coef=1.0, whiten=False)
    close(adv, [[1.0, 1.0], [-1.0, 0.0]])


def test_prime_gives_zero_advantage_to_a_group_with_equal_outcomes_and_process_rewards():
    mask = b([[True, True], [True, True]])
    adv = prime(t([1.0, 1.0]), torch.full((2, 2), 0.25), mask, group_size=2, whiten=False)
    close(adv, [[0.0, 0.0], [0.0, 0.0]])
