"""Advantage estimators against hand-computed numbers (arithmetic in the comments)."""

import inspect
import math

import pytest
import torch
from torch import Tensor

from posttrain.objectives.advantages import (
    bnpo,
    gae,
    group_reward_inputs,
    grpo,
    reinforce,
    reinforce_pp,
    reinforce_pp_baseline,
    remax,
    rloo,
    spo,
)
from posttrain.objectives.registry import ADVANTAGES


def t(values) -> Tensor:
    return torch.tensor(values, dtype=torch.float32)


def m(rows) -> Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def test_registered_names_and_needs_read_from_the_signatures():
    assert set(ADVANTAGES["gae"].needs) == {"token_rewards", "critic"}
    assert ADVANTAGES["grpo"].needs == ("groups",)
    assert ADVANTAGES["rloo"].needs == ("groups",)
    assert set(ADVANTAGES["remax"].needs) == {"greedy_rollout", "groups"}
    assert ADVANTAGES["reinforce_pp"].needs == ("token_rewards",)
    assert set(ADVANTAGES["reinforce_pp_baseline"].needs) == {"groups", "token_rewards"}
    assert ADVANTAGES["reinforce"].needs == ("moving_baseline",)
    assert ADVANTAGES["bnpo"].needs == ("groups",)
    assert ADVANTAGES["spo"].needs == ("groups",)


# ---------------------------------------------------------------- gae


def test_gae_recursion_matches_hand_computation():
    # rewards [0, 0, 1], values [0.5, 0.6, 0.7], gamma 1, lam 0.5, V after the end = 0
    # t=2: delta = 1 + 0 - 0.7 = 0.3                      A2 = 0.3
    # t=1: delta = 0 + 0.7 - 0.6 = 0.1                    A1 = 0.1 + 0.5 * 0.3 = 0.25
    # t=0: delta = 0 + 0.6 - 0.5 = 0.1                    A0 = 0.1 + 0.5 * 0.25 = 0.225
    adv = gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.7]]), m([[1, 1, 1]]), gamma=1.0, lam=0.5, whiten=False)
    torch.testing.assert_close(adv, t([[0.225, 0.25, 0.3]]))


def test_gae_with_discount_and_padding():
    # row 0, gamma 0.5, lam 1, valid length 2, padding holds junk reward 9 and value 9 (ignored):
    #   t=1: delta = 1 + 0.5 * 0 - 0.4 = 0.6                A1 = 0.6
    #   t=0: delta = 0 + 0.5 * 0.4 - 0.2 = 0.0              A0 = 0 + 0.5 * 1 * 0.6 = 0.3
    # row 1: all padding -> zeros
    rewards = t([[0.0, 1.0, 9.0], [9.0, 9.0, 9.0]])
    values = t([[0.2, 0.4, 9.0], [9.0, 9.0, 9.0]])
    adv = gae(rewards, values, m([[1, 1, 0], [0, 0, 0]]), gamma=0.5, lam=1.0, whiten=False)
    torch.testing.assert_close(adv, t([[0.3, 0.6, 0.0], [0.0, 0.0, 0.0]]))


def test_gae_skips_a_hole_in_the_mask():
    # mask [1, 0, 1]: position 1 (tool output) is skipped; token 0's next value is token 2's.
    # gamma 1, lam 1: t=2: A2 = 1 - 0.7 = 0.3; t=0: delta = 0 + 0.7 - 0.5 = 0.2, A0 = 0.2 + 0.3 = 0.5
    adv = gae(t([[0.0, 5.0, 1.0]]), t([[0.5, 5.0, 0.7]]), m([[1, 0, 1]]), gamma=1.0, lam=1.0, whiten=False)
    torch.testing.assert_close(adv, t([[0.5, 0.0, 0.3]]))


def test_gae_whitening_is_over_valid_tokens_with_biased_std():
    # gamma = lam = 1 -> A_t = R - V_t = 1 - [-2, -1, 0] = [3, 2, 1]; row 1 is padding
    # mean 2, biased var = (1 + 0 + 1) / 3 = 2/3, std = 0.816497 -> [1.224745, 0, -1.224745]
    rewards = t([[0.0, 0.0, 1.0], [7.0, 7.0, 7.0]])
    values = t([[-2.0, -1.0, 0.0], [7.0, 7.0, 7.0]])
    adv = gae(rewards, values, m([[1, 1, 1], [0, 0, 0]]), gamma=1.0, lam=1.0, whiten=True)
    torch.testing.assert_close(adv, t([[1.224745, 0.0, -1.224745], [0.0, 0.0, 0.0]]))


def test_gae_defaults_and_lambda_returns():
    # defaults gamma 1, lam 0.95; one valid token: A = r - V = 1 - 0.25 = 0.75 (no whitening)
    # lambda-return target = A + V = 1.0 = the reward
    values = t([[0.25]])
    adv = gae(t([[1.0]]), values, m([[1]]), whiten=False)
    torch.testing.assert_close(adv + values, t([[1.0]]))
    # with whitening, a single token centres to 0 (variance floored, no NaN)
    assert gae(t([[1.0]]), values, m([[1]])).item() == 0.0


def test_gae_carries_no_gradient():
    values = t([[0.5, 0.6]]).requires_grad_()
    adv = gae(t([[0.0, 1.0]]), values, m([[1, 1]]), whiten=False)
    assert not adv.requires_grad


# ---------------------------------------------------------------- grpo / rloo / remax / reinforce


def test_grpo_uses_the_unbiased_group_std():
    # group [1, 0, 0, 1]: mean 0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.577350
    # default eps 1e-4 (TRL's): A = +-0.5 / (0.577350 + 1e-4) = +-0.5 / 0.577450 = +-0.865875
    adv = grpo(t([1.0, 0.0, 0.0, 1.0]), group_size=4)
    torch.testing.assert_close(adv, t([0.865875, -0.865875, -0.865875, 0.865875]))
    # groups [3, 1] and [0, 0]: mean 2, unbiased std = sqrt((1 + 1) / 1) = 1.414214
    # -> A = +-1 / 1.414314 = +-0.707057; the [0, 0] group gives 0 / 1e-4 = 0
    adv = grpo(t([3.0, 1.0, 0.0, 0.0]), group_size=2)
    torch.testing.assert_close(adv, t([0.707057, -0.707057, 0.0, 0.0]))


def test_grpo_group_with_equal_rewards_gives_zeros_not_nan():
    # group 0 [2, 2, 2]: r - mean = 0, std = 0 -> 0 / (0 + 1e-4) = 0
    # group 1 [0, 3, 0]: mean 1, unbiased var = (1 + 4 + 1) / 2 = 3, std = 1.732051, + 1e-4 = 1.732151
    #   -> [-1 / 1.732151, 2 / 1.732151, -1 / 1.732151] = [-0.577317, 1.154634, -0.577317]
    adv = grpo(t([2.0, 2.0, 2.0, 0.0, 3.0, 0.0]), group_size=3)
    assert torch.isfinite(adv).all()
    torch.testing.assert_close(adv, t([0.0, 0.0, 0.0, -0.577317, 1.154634, -0.577317]))


def test_grpo_rejects_a_zero_eps():
    with pytest.raises(ValueError, match=r"eps=0\.0"):
        grpo(t([1.0, 1.0]), group_size=2, eps=0.0)


def test_dr_grpo_only_centres():
    # group [1, 0, 0, 1]: mean 0.5 -> [0.5, -0.5, -0.5, 0.5]
    adv = grpo(t([1.0, 0.0, 0.0, 1.0]), group_size=4, scale_std=False)
    torch.testing.assert_close(adv, t([0.5, -0.5, -0.5, 0.5]))


def test_grpo_and_rloo_reject_groups_of_one():
    with pytest.raises(ValueError, match="group_size=1"):
        grpo(t([1.0, 0.0]), group_size=1)
    with pytest.raises(ValueError, match="group_size=1"):
        rloo(t([1.0, 0.0]), group_size=1)


def test_rloo_leaves_each_sample_out():
    # group [1, 0, 0, 1]: baselines 1/3, 2/3, 2/3, 1/3 -> advantages 2/3, -2/3, -2/3, 2/3
    adv = rloo(t([1.0, 0.0, 0.0, 1.0]), group_size=4)
    torch.testing.assert_close(adv, t([2 / 3, -2 / 3, -2 / 3, 2 / 3]))


def test_rloo_is_the_group_centred_reward_scaled_by_g_over_g_minus_1():
    # group [3, 1, 2]: baselines (1+2)/2 = 1.5, (3+2)/2 = 2.5, (3+1)/2 = 2 -> [1.5, -1.5, 0]
    # (= (r - mean) * G/(G-1) = [1, -1, 0] * 1.5)
    torch.testing.assert_close(rloo(t([3.0, 1.0, 2.0]), group_size=3), t([1.5, -1.5, 0.0]))


def test_remax_subtracts_the_greedy_reward_of_the_same_prompt():
    # prompt 0: greedy 0.5 -> [1 - 0.5, 0 - 0.5]; prompt 1: greedy 1 -> [0.5 - 1, 1 - 1]
    adv = remax(t([1.0, 0.0, 0.5, 1.0]), t([0.5, 1.0]), group_size=2)
    torch.testing.assert_close(adv, t([0.5, -0.5, -0.5, 0.0]))


def test_reinforce_subtracts_the_moving_baseline():
    # baseline 0.25: [1 - 0.25, 0 - 0.25, 0.5 - 0.25]
    adv = reinforce(t([1.0, 0.0, 0.5]), torch.tensor(0.25))
    torch.testing.assert_close(adv, t([0.75, -0.25, 0.25]))


# ---------------------------------------------------------------- reinforce++


TOKEN_REWARDS = t([[-0.1, 0.0, 0.9], [0.0, -1.0, 0.0]])
TOKEN_MASK = m([[1, 1, 1], [1, 1, 0]])


def test_reinforce_pp_returns_then_batch_normalisation():
    # returns (gamma 1): row 0 [-0.1 + 0 + 0.9, 0 + 0.9, 0.9] = [0.8, 0.9, 0.9]; row 1 [-1, -1, pad]
    # valid: 0.8, 0.9, 0.9, -1, -1 -> mean 0.6 / 5 = 0.12
    # centred: 0.68, 0.78, 0.78, -1.12, -1.12
    # biased var = (0.4624 + 0.6084 + 0.6084 + 1.2544 + 1.2544) / 5 = 4.188 / 5 = 0.8376, std 0.915205
    # -> 0.743003, 0.852268, 0.852268, -1.223770, -1.223770
    adv = reinforce_pp(TOKEN_REWARDS, TOKEN_MASK)
    expected = t([[0.743003, 0.852268, 0.852268], [-1.223770, -1.223770, 0.0]])
    torch.testing.assert_close(adv, expected)


def test_reinforce_pp_without_std_only_centres():
    # centred values from the test above
    adv = reinforce_pp(TOKEN_REWARDS, TOKEN_MASK, scale_std=False)
    torch.testing.assert_close(adv, t([[0.68, 0.78, 0.78], [-1.12, -1.12, 0.0]]))


def test_reinforce_pp_discounts_the_return():
    # row 0 alone, gamma 0.5: G2 = 0.9; G1 = 0 + 0.5 * 0.9 = 0.45; G0 = -0.1 + 0.5 * 0.45 = 0.125
    # mean (0.9 + 0.45 + 0.125) / 3 = 1.475 / 3 = 0.491667 -> centred [-0.366667, -0.041667, 0.408333]
    adv = reinforce_pp(TOKEN_REWARDS[:1], TOKEN_MASK[:1], gamma=0.5, scale_std=False)
    torch.testing.assert_close(adv, t([[-0.366667, -0.041667, 0.408333]]))


def test_reinforce_pp_equal_returns_give_zeros_not_nan():
    # every valid token has return 1 -> centred 0, variance 0 floored at 1e-8 -> 0
    adv = reinforce_pp(t([[0.0, 1.0], [1.0, 0.0]]), m([[1, 1], [1, 0]]))
    torch.testing.assert_close(adv, torch.zeros(2, 2))


def test_reinforce_pp_baseline_subtracts_the_group_mean_before_normalising():
    # P=2, G=2. outcome rewards [1, 0 | 0.5, 0.5] -> group means 0.5, 0.5
    # row 0: token rewards [-0.1, -0.1, 0.9] (r=1 minus KL 0.1 per token) -> returns [0.7, 0.8, 0.9]
    # row 1: [0, 0, pad] -> [0, 0]; row 2: [0, 0.5, pad] -> [0.5, 0.5]; row 3: [0.5, pad, pad] -> [0.5]
    # minus the group mean 0.5 on every valid token:
    #   [0.2, 0.3, 0.4], [-0.5, -0.5], [0, 0], [0]
    # batch mean over 8 tokens: (0.9 - 1.0) / 8 = -0.0125
    # centred: 0.2125, 0.3125, 0.4125, -0.4875, -0.4875, 0.0125, 0.0125, 0.0125
    rewards = t([1.0, 0.0, 0.5, 0.5])
    token_rewards = t([[-0.1, -0.1, 0.9], [0.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.5, 0.0, 0.0]])
    mask = m([[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 0, 0]])
    centred = reinforce_pp_baseline(rewards, token_rewards, mask, group_size=2, scale_std=False)
    expected = t([[0.2125, 0.3125, 0.4125], [-0.4875, -0.4875, 0], [0.0125, 0.0125, 0], [0.0125, 0, 0]])
    torch.testing.assert_close(centred, expected)
    # squares: 0.04515625 + 0.09765625 + 0.17015625 + 2 * 0.23765625 + 3 * 0.00015625 = 0.78875
    # biased var = 0.78875 / 8 = 0.09859375, std = 0.313996
    adv = reinforce_pp_baseline(rewards, token_rewards, mask, group_size=2)
    torch.testing.assert_close(adv, expected / 0.313996, atol=1e-5, rtol=1e-5)


def test_reinforce_pp_baseline_group_with_equal_rewards_and_no_kl_gives_zeros():
    # every completion of the single prompt scores 1, no KL: returns 1 - mean 1 = 0 everywhere
    adv = reinforce_pp_baseline(t([1.0, 1.0]), t([[0.0, 1.0], [1.0, 0.0]]), m([[1, 1], [1, 0]]), group_size=2)
    assert torch.isfinite(adv).all()
    torch.testing.assert_close(adv, torch.zeros(2, 2))


def test_sequence_estimators_return_one_value_per_completion():
    # shapes: [P*G] in, [P*G] out (the loop broadcasts over tokens)
    rewards = t([1.0, 0.0, 0.5, 0.25])
    for adv in (grpo(rewards, group_size=2), rloo(rewards, group_size=2), reinforce(rewards, t(0.0))):
        assert adv.shape == (4,)
    assert remax(rewards, t([0.0, 0.0]), group_size=2).shape == (4,)
    assert math.isfinite(float(grpo(rewards, group_size=2).sum()))


# ---------------------------------------------------------------- bnpo


def test_bnpo_divides_by_a_beta_density_fitted_to_the_group_accuracies():
    # groups of 4 with accuracies p = 0.25, 0.5, 0.75: mean m = 0.5, unbiased variance v = (0.0625 + 0 + 0.0625) / 2
    # = 0.0625; m (1 - m) / v - 1 = 3, a = b = 1.5 -> alpha = beta = 1 + 1.5 / 3 = 1.5
    # Beta(1.5, 1.5) density = sqrt(p (1 - p)) / B(1.5, 1.5), B = Gamma(1.5)^2 / Gamma(3) = pi / 8 = 0.392699
    #   p 0.5:  0.5 / 0.392699 = 1.273240 -> weight 0.785398; A = +-0.5 * 0.785398 = +-0.392699
    #   p 0.25: 0.433013 / 0.392699 = 1.102658 -> weight 0.906900; right 0.75 * 0.9069 = 0.680175, wrong -0.226725
    adv = bnpo(t([1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0]), group_size=4)
    expected = [0.680175, -0.226725, -0.226725, -0.226725, 0.392699, 0.392699, -0.392699, -0.392699,
                0.226725, 0.226725, 0.226725, -0.680175]  # fmt: skip
    torch.testing.assert_close(adv, t(expected), atol=1e-5, rtol=0)


def test_bnpo_with_a_uniform_density_is_the_group_centred_reward():
    # one prompt in the step: m = 0, v = 1 (the authors' convention) -> a = 0, b = -1 -> alpha = 1, beta =
    # max(1 - 1/3, 1) = 1: uniform, weight 1, A = r - p (p = 0.25)
    torch.testing.assert_close(bnpo(t([1, 0, 0, 0]), group_size=4), t([0.75, -0.25, -0.25, -0.25]))
    # equal accuracies (v = 0, where the authors' code divides by zero): weight 1, A = r - 0.5
    torch.testing.assert_close(bnpo(t([1, 0, 0, 1]), group_size=2), t([0.5, -0.5, -0.5, 0.5]))
    # all-right and all-wrong groups give 0 whatever their density (p = 1 and 0, weight capped at 1e6)
    adv = bnpo(t([1, 1, 0, 0, 1, 0]), group_size=2)
    torch.testing.assert_close(adv[:4], torch.zeros(4))


def test_bnpo_maps_the_reward_range_to_zero_one_and_refuses_rewards_outside_it():
    # rewards in [-1, 1] with reward_min -1: r' = (r + 1) / 2 = [1, 0, 0, 0] -> as the uniform case above
    torch.testing.assert_close(bnpo(t([1, -1, -1, -1]), group_size=4, reward_min=-1.0), t([0.75, -0.25, -0.25, -0.25]))
    with pytest.raises(ValueError, match=r"rewards outside \[reward_min, reward_max\]"):
        bnpo(t([2.0, 0.0]), group_size=2)


def test_group_reward_inputs_give_each_row_its_reward_and_its_groups_mean():
    inputs = group_reward_inputs(t([1.0, 0.0, 0.0, 0.0, 1.0, 1.0]), group_size=3)
    torch.testing.assert_close(inputs["rewards_B"], t([1.0, 0.0, 0.0, 0.0, 1.0, 1.0]))
    torch.testing.assert_close(inputs["group_mean_rewards_B"], t([1 / 3] * 3 + [2 / 3] * 3))


# ---------------------------------------------------------------- spo


def test_spo_advantage_is_the_win_rate_against_the_group_minus_a_half():
    # group [1, 0, 0, 1]: each 1 beats two 0s and ties the other 1: (2 + 0.5) / 3 = 0.833333 -> +0.333333;
    #                     each 0 ties the other 0 and loses twice: 0.5 / 3 = 0.166667 -> -0.333333
    # group [3, 2, 1, 0]: win rates 1, 2/3, 1/3, 0 -> 0.5, 0.166667, -0.166667, -0.5 (only the order counts)
    adv = spo(t([1.0, 0.0, 0.0, 1.0, 3.0, 2.0, 1.0, 0.0]), group_size=4)
    torch.testing.assert_close(adv, t([1 / 3, -1 / 3, -1 / 3, 1 / 3, 0.5, 1 / 6, -1 / 6, -0.5]))
    # a group of equal scores: every win rate 1/2, advantage 0; a monotone transform of the scores changes nothing
    torch.testing.assert_close(spo(t([0.7, 0.7]), group_size=2), torch.zeros(2))
    scores = t([0.1, 5.0, -2.0])
    torch.testing.assert_close(spo(scores, group_size=3), spo(scores.exp(), group_size=3))


# ---------------------------------------------------------------- the calling contract

ALWAYS_SUPPLIED = {"rewards_PG", "mask_B_T"}
SUPPLIED_BY_NEED = {
    "groups": "group_size",
    "token_rewards": "token_rewards_B_T",
    "critic": "values_B_T",
    "greedy_rollout": "greedy_rewards_P",
    "moving_baseline": "baseline",
}
BUILT_IN = ["gae", "grpo", "rloo", "remax", "reinforce_pp", "reinforce_pp_baseline", "reinforce", "bnpo", "spo"]


@pytest.mark.parametrize("name", BUILT_IN)
def test_signature_names_only_inputs_the_loop_supplies(name):
    # every parameter without a default is an input the loop supplies for this estimator's needs;
    # every parameter with a default (a hyper-parameter) is keyword-only
    fn = ADVANTAGES[name]
    supplied = ALWAYS_SUPPLIED | {SUPPLIED_BY_NEED[need] for need in fn.needs}
    for param in inspect.signature(fn).parameters.values():
        if param.default is inspect.Parameter.empty:
            assert param.name in supplied, f"{name}: '{param.name}' is not supplied by needs {fn.needs}"
        else:
            assert param.kind is inspect.Parameter.KEYWORD_ONLY, (
                f"{name}: '{param.name}' must be keyword-only"
            )
    assert "arXiv:" in fn.__doc__ or "Williams 1992" in fn.__doc__
    assert "Deviations" in fn.__doc__


def test_turn_returns_discounts_per_turn_with_a_group_baseline():
    from posttrain.objectives.advantages import turn_returns

    # episode 0: turns [0, 0, 0] env [1] turns [1, 1]; reward 1.0 on turn 0, 2.0 on turn 1 (the outcome)
    # episode 1: one turn of 2 tokens, reward 0.0
    tokens_B_T = t([[0, 0, 1.0, 0, 0, 2.0], [0, 0.0, 0, 0, 0, 0]])
    turns_B_T = torch.tensor([[0, 0, 0, -1, 1, 1], [0, 0, -1, -1, -1, -1]])
    mask_B_T = turns_B_T >= 0
    # gamma 0.5: episode 0 G_0 = 1 + 0.5 * 2 = 2, G_1 = 2; episode 1 G_0 = 0
    # baseline: mean G_0 = 1, unbiased std of [2, 0] = sqrt(2) = 1.414214 (+ eps 1e-4)
    # episode 0 turn 0: (2 - 1) / 1.414314 = 0.707057; turn 1: (2 - 1) / 1.414314; episode 1: -0.707057
    adv = turn_returns(tokens_B_T, turns_B_T, mask_B_T, group_size=2, gamma=0.5)
    a = 1 / (2**0.5 + 1e-4)
    torch.testing.assert_close(adv, t([[a, a, a, 0, a, a], [-a, -a, 0, 0, 0, 0]]))
    # gamma 0: turn 0 earns its own 1 only: (1 - 0.5) / (std of [1, 0] + eps); turn 1: (2 - 0.5) / the same
    s = 2**0.5 / 2 + 1e-4
    adv0 = turn_returns(tokens_B_T, turns_B_T, mask_B_T, group_size=2, gamma=0.0)
    torch.testing.assert_close(adv0, t([[0.5 / s] * 3 + [0, 1.5 / s, 1.5 / s], [-0.5 / s] * 2 + [0] * 4]))


def test_turn_returns_with_gamma_one_and_an_outcome_reward_is_grpo():
    from posttrain.objectives.advantages import turn_returns

    # only the last turn is rewarded: every turn's return-to-go is the episode's reward
    tokens_B_T = t([[0, 0, 0, 1.5], [0, 0, 0, 0.0], [0, 0, 0, 3.0], [0.0, 0, 0, 1]])
    turns_B_T = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0], [0, -1, 1, 1], [0, 0, 0, 0]])
    mask_B_T = turns_B_T >= 0
    adv = turn_returns(tokens_B_T, turns_B_T, mask_B_T, group_size=2)
    expected = grpo(t([1.5, 0.0, 3.0, 1.0]), group_size=2)
    torch.testing.assert_close(adv, torch.where(mask_B_T, expected[:, None].expand(4, 4), 0.0))
