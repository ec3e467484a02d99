"""Clipped value loss against hand-computed numbers."""

import torch
from torch import Tensor

from posttrain.objectives.value import clipped_value_loss, lambda_returns


def t(values) -> Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_clipped_value_loss_takes_the_larger_error():
    # clip_range 0.2 around the old value:
    # a: v 1.5, old 1, R 2: (1.5 - 2)^2 = 0.25; v clipped 1.2: (1.2 - 2)^2 = 0.64 -> 0.5 * 0.64 = 0.32
    # b: v 1.1, old 1, R 2: (1.1 - 2)^2 = 0.81; inside the range, same -> 0.5 * 0.81 = 0.405
    # c: v 0.5, old 1, R 0: 0.25; clipped 0.8: 0.64 -> 0.32
    # d: v 1.5, old 1, R 1: 0.25; clipped 1.2: 0.04 -> 0.5 * 0.25 = 0.125
    values = t([[1.5, 1.1, 0.5, 1.5]]).requires_grad_()
    loss = clipped_value_loss(values, t([[1.0, 1.0, 1.0, 1.0]]), t([[2.0, 2.0, 0.0, 1.0]]))
    torch.testing.assert_close(loss, t([[0.32, 0.405, 0.32, 0.125]]))
    # gradient: a, c take the clipped branch (constant in v) -> 0; b: v - R = -0.9; d: v - R = 0.5
    loss.sum().backward()
    torch.testing.assert_close(values.grad, t([[0.0, -0.9, 0.0, 0.5]]))


def test_value_equal_to_return_gives_zero_loss():
    # v = old = R = 0.7: both errors 0
    loss = clipped_value_loss(t([[0.7]]), t([[0.7]]), t([[0.7]]))
    torch.testing.assert_close(loss, t([[0.0]]))


def test_a_wide_clip_range_is_the_plain_squared_error():
    # clip_range 100: v 1.5, R 2 -> 0.5 * 0.25 = 0.125
    loss = clipped_value_loss(t([[1.5]]), t([[1.0]]), t([[2.0]]), clip_range=100.0)
    torch.testing.assert_close(loss, t([[0.125]]))


def test_lambda_returns_match_hand_computed_values():
    # one row, prompt at t=0 (masked out), completion t=1..3; reward 1 at the last token; gamma 1, lam 0.5
    # V = [_, 0.5, 0.2, 0.4]
    # t=3: delta = 1 + 0 - 0.4 = 0.6;            A = 0.6;               R = 0.6 + 0.4 = 1.0
    # t=2: delta = 0 + 0.4 - 0.2 = 0.2;          A = 0.2 + 0.5 * 0.6 = 0.5;   R = 0.5 + 0.2 = 0.7
    # t=1: delta = 0 + 0.2 - 0.5 = -0.3;         A = -0.3 + 0.5 * 0.5 = -0.05; R = -0.05 + 0.5 = 0.45
    rewards = t([[0.0, 0.0, 0.0, 1.0]])
    values = t([[9.0, 0.5, 0.2, 0.4]])
    mask = torch.tensor([[False, True, True, True]])
    returns = lambda_returns(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(returns, t([[0.0, 0.45, 0.7, 1.0]]))


def test_lambda_returns_with_lam_one_are_discounted_reward_sums():
    # lam = 1: R_t = sum_{s >= t} gamma^(s - t) r_s whatever V; gamma 0.5, rewards [1, 0, 2]
    # R_2 = 2; R_1 = 0 + 0.5 * 2 = 1; R_0 = 1 + 0.5 * 1 = 1.5
    returns = lambda_returns(t([[1.0, 0.0, 2.0]]), t([[0.3, -1.0, 5.0]]), torch.ones(1, 3, dtype=torch.bool),
                             gamma=0.5, lam=1.0)
    torch.testing.assert_close(returns, t([[1.5, 1.0, 2.0]]))
