"""Policy losses against hand-computed numbers (arithmetic in the comments), gradient signs, masking."""

import inspect

import pytest
import torch
from torch import Tensor

from posttrain.objectives.aggregation import seq_mean_token_mean, seq_mean_token_sum_norm
from posttrain.objectives.policy_losses import cispo, entropy_bonus, gmpo, gspo, nft, pg, ppo, sapo, topr
from posttrain.objectives.registry import POLICY_LOSSES


def t(values) -> Tensor:
    return torch.tensor(values, dtype=torch.float32)


def m(rows) -> Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def logps_with_ratios(ratios, old: float = -2.0) -> tuple[Tensor, Tensor]:
    """(logp, old_logp) with logp - old_logp = log(ratio); logp requires grad."""
    old_logp = torch.full((1, len(ratios)), old)
    logp = (old_logp + torch.log(t([ratios]))).requires_grad_()
    return logp, old_logp


def test_registered_names():
    assert {"ppo", "gspo", "cispo", "topr", "pg", "gmpo", "sapo", "nft"} <= set(POLICY_LOSSES)
    assert all(POLICY_LOSSES[name].needs == () for name in ("ppo", "gspo", "cispo", "topr", "pg", "gmpo", "sapo"))
    assert POLICY_LOSSES["nft"].needs == ("group_rewards",)


# ---------------------------------------------------------------- ppo


def test_ppo_asymmetric_clip_matches_hand_computation():
    # clip_low 0.2, clip_high 0.28 -> clip range [0.8, 1.28]
    # a: rho 1.5, A  1: min(1.5, 1.28) = 1.28        -> loss -1.28, clipped
    # b: rho 0.5, A  1: min(0.5, 0.8) = 0.5          -> loss -0.5
    # c: rho 0.5, A -1: min(-0.5, -0.8) = -0.8       -> loss  0.8,  clipped
    # d: rho 1.5, A -1: min(-1.5, -1.28) = -1.5      -> loss  1.5
    # e: rho 1.0, A  2: min(2, 2) = 2                -> loss -2
    logp, old = logps_with_ratios([1.5, 0.5, 0.5, 1.5, 1.0])
    adv = t([[1.0, 1.0, -1.0, -1.0, 2.0]])
    loss, clipped = ppo(logp, old, adv, m([[1] * 5]), clip_low=0.2, clip_high=0.28)
    torch.testing.assert_close(loss, t([[-1.28, -0.5, 0.8, 1.5, -2.0]]))
    torch.testing.assert_close(clipped, t([[1.0, 0.0, 1.0, 0.0, 0.0]]))


def test_ppo_gradient_is_zero_where_clipped_and_minus_rho_a_elsewhere():
    # d loss / d logp = -A * rho where the unclipped term is active, 0 where the clip is
    # a: clipped -> 0; b: -1 * 0.5 = -0.5; c: clipped -> 0; d: -(-1) * 1.5 = 1.5; e: -2 * 1 = -2
    logp, old = logps_with_ratios([1.5, 0.5, 0.5, 1.5, 1.0])
    loss, _ = ppo(logp, old, t([[1.0, 1.0, -1.0, -1.0, 2.0]]), m([[1] * 5]), clip_low=0.2, clip_high=0.28)
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, t([[0.0, -0.5, 0.0, 1.5, -2.0]]))


def test_ppo_ratio_exactly_one_is_plain_policy_gradient():
    # rho = 1: loss = -A, clipped nowhere; gradient -A: descent raises logp where A > 0, lowers it where A < 0
    logp, old = logps_with_ratios([1.0, 1.0])
    loss, clipped = ppo(logp, old, t([[0.5, -0.5]]), m([[1, 1]]))
    loss.sum().backward()
    torch.testing.assert_close(loss, t([[-0.5, 0.5]]))
    torch.testing.assert_close(clipped, t([[0.0, 0.0]]))
    torch.testing.assert_close(logp.grad, t([[-0.5, 0.5]]))
    assert logp.grad[0, 0] < 0 < logp.grad[0, 1]  # step -lr * grad: logp up for A > 0, down for A < 0


def test_ppo_dual_clip_bounds_negative_advantages():
    # dual clip c = 3, symmetric clip 0.2
    # a: rho 4,   A -1: -min(-4, -1.2) = 4 > c * |A| = 3   -> loss 3, clipped, zero gradient
    # b: rho 1.5, A -1: -min(-1.5, -1.2) = 1.5 < 3         -> loss 1.5, gradient -A * rho = 1.5
    # c: rho 4,   A  1: -min(4, 1.2) = -1.2 (dual clip ignores A > 0) -> loss -1.2, clipped
    logp, old = logps_with_ratios([4.0, 1.5, 4.0])
    loss, clipped = ppo(logp, old, t([[-1.0, -1.0, 1.0]]), m([[1, 1, 1]]), dual_clip=3.0)
    loss.sum().backward()
    torch.testing.assert_close(loss, t([[3.0, 1.5, -1.2]]))
    torch.testing.assert_close(clipped, t([[1.0, 0.0, 1.0]]))
    torch.testing.assert_close(logp.grad, t([[0.0, 1.5, 0.0]]))
    with pytest.raises(ValueError, match="dual_clip"):
        ppo(logp, old, t([[-1.0, -1.0, 1.0]]), m([[1, 1, 1]]), dual_clip=1.0)


def test_ppo_zeroes_padding_even_when_it_holds_extreme_values():
    # padding position: logp 0, old logp -1000 (log-ratio 1000, clamped to 20): still 0 loss, 0 clipped
    logp = t([[-1.0, 0.0]]).requires_grad_()
    old = t([[-1.0, -1000.0]])
    loss, clipped = ppo(logp, old, t([[1.0, 1.0]]), m([[1, 0]]))
    loss.sum().backward()
    torch.testing.assert_close(loss, t([[-1.0, 0.0]]))
    torch.testing.assert_close(clipped, t([[0.0, 0.0]]))
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 1] == 0


# ---------------------------------------------------------------- gspo


def test_gspo_uses_the_length_normalised_sequence_ratio():
    # row 0: log-ratios [0.1, 0.3], mean 0.2 -> s = e^0.2 = 1.221403, A = 1
    #   wide clip (0.2, 0.28) -> [0.8, 1.28]: not clipped, loss -1.221403 on both tokens
    # row 1: log-ratios [-0.2, junk 5 in padding], mean over valid = -0.2 -> s = e^-0.2 = 0.818731, A = -1
    #   -min(-0.818731, -0.818731 clipped to [0.8, 1.28] = -0.818731) = 0.818731, not clipped
    old = t([[-1.0, -1.0], [-1.0, -1.0]])
    logp = (old + t([[0.1, 0.3], [-0.2, 5.0]])).requires_grad_()
    adv = t([[1.0, 1.0], [-1.0, -1.0]])
    mask = m([[1, 1], [1, 0]])
    loss, clipped = gspo(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    torch.testing.assert_close(loss, t([[-1.221403, -1.221403], [0.818731, 0.0]]))
    torch.testing.assert_close(clipped, torch.zeros(2, 2))
    # GSPO-token gradient: d loss_t / d logp_t = -A * s (ratio value sg[s], gradient s * grad logp_t)
    # row 0: -1.221403 per token; row 1: +0.818731 on the valid token, 0 on padding
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, t([[-1.221403, -1.221403], [0.818731, 0.0]]))


def test_gspo_token_with_seq_mean_token_mean_has_the_sequence_level_gradient():
    # GSPO's sequence objective for row 0: J = A * s, s = exp(mean_t(logp_t - old_t)), over S = 2 sequences
    # dJ/dlogp_t = A * s / |y| = 1.221403 / 2; the loss -J / S has gradient -1.221403 / 2 / 2 = -0.305351
    # row 1 (|y| = 1, A = -1, s = 0.818731): gradient +0.818731 / 1 / 2 = 0.409365 on its valid token
    old = t([[-1.0, -1.0], [-1.0, -1.0]])
    logp = (old + t([[0.1, 0.3], [-0.2, 5.0]])).requires_grad_()
    mask = m([[1, 1], [1, 0]])
    loss_B_T, _ = gspo(logp, old, t([[1.0, 1.0], [-1.0, -1.0]]), mask, clip_low=0.2, clip_high=0.28)
    seq_mean_token_mean(loss_B_T, mask, num_seqs=2).backward()
    torch.testing.assert_close(logp.grad, t([[-0.305351, -0.305351], [0.409365, 0.0]]))


def test_gspo_default_clip_is_the_papers_tiny_range():
    # same row 0: s = 1.221403 > 1 + 4e-4 -> clipped to 1.0004: loss -min(1.221403, 1.0004) = -1.0004
    # row 1: s = 0.818731 < 1 - 3e-4 = 0.9997, A = -1: -min(-0.818731, -0.9997) = 0.9997, clipped
    old = t([[-1.0, -1.0], [-1.0, -1.0]])
    logp = (old + t([[0.1, 0.3], [-0.2, 5.0]])).requires_grad_()
    loss, clipped = gspo(logp, old, t([[1.0, 1.0], [-1.0, -1.0]]), m([[1, 1], [1, 0]]))
    torch.testing.assert_close(loss, t([[-1.0004, -1.0004], [0.9997, 0.0]]))
    torch.testing.assert_close(clipped, t([[1.0, 1.0], [1.0, 0.0]]))
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.zeros(2, 2))  # every sequence clipped


def test_gspo_on_policy_equals_plain_policy_gradient():
    # logp = old_logp: s = 1, loss = -A per token, gradient -A
    logp = t([[-0.5, -1.5, -2.0]]).requires_grad_()
    loss, clipped = gspo(logp, logp.detach(), t([[2.0, 2.0, 2.0]]), m([[1, 1, 1]]))
    loss.sum().backward()
    torch.testing.assert_close(loss, t([[-2.0, -2.0, -2.0]]))
    torch.testing.assert_close(logp.grad, t([[-2.0, -2.0, -2.0]]))
    assert clipped.sum() == 0


def test_gspo_all_padding_row_is_zero():
    logp = t([[-1.0, -1.0]]).requires_grad_()
    loss, clipped = gspo(logp, t([[-3.0, -3.0]]), t([[1.0, 1.0]]), m([[0, 0]]))
    loss.sum().backward()
    assert loss.abs().sum() == 0 and clipped.sum() == 0 and logp.grad.abs().sum() == 0


# ---------------------------------------------------------------- cispo


def test_cispo_clips_the_detached_weight_not_the_gradient():
    # rho [1.5, 0.5, 6], A [1, -1, 2], logp [-1, -2, -0.5]; default clip_high 4 -> cap 5, no lower bound
    # weights [1.5, 0.5, 5]
    # loss = -w * A * logp: -1.5 * 1 * -1 = 1.5; -0.5 * -1 * -2 = -1.0; -5 * 2 * -0.5 = 5.0
    # gradient = -w * A:    -1.5;               0.5;                 -10   (never zero: nothing dropped)
    logp = t([[-1.0, -2.0, -0.5]]).requires_grad_()
    old = logp.detach() - torch.log(t([[1.5, 0.5, 6.0]]))
    loss, clipped = cispo(logp, old, t([[1.0, -1.0, 2.0]]), m([[1, 1, 1]]))
    loss.sum().backward()
    torch.testing.assert_close(loss, t([[1.5, -1.0, 5.0]]))
    torch.testing.assert_close(clipped, t([[0.0, 0.0, 1.0]]))
    torch.testing.assert_close(logp.grad, t([[-1.5, 0.5, -10.0]]))


def test_cispo_optional_lower_bound():
    # clip_low 0.2, clip_high 0.28: rho 0.5 -> w 0.8, loss -0.8 * -1 * -2 = -1.6; rho 1.5 -> 1.28,
    # loss -1.28 * 1 * -1 = 1.28; both clipped
    logp = t([[-2.0, -1.0]]).requires_grad_()
    old = logp.detach() - torch.log(t([[0.5, 1.5]]))
    loss, clipped = cispo(logp, old, t([[-1.0, 1.0]]), m([[1, 1]]), clip_low=0.2, clip_high=0.28)
    torch.testing.assert_close(loss, t([[-1.6, 1.28]]))
    torch.testing.assert_close(clipped, t([[1.0, 1.0]]))


# ---------------------------------------------------------------- topr


def test_topr_truncates_only_negative_sequences():
    # row 0: A = +1, log-ratios [0.5, 0.5] (rho = e) -> w = 1 (positives are not reweighted)
    # row 1: A = -1, same rho = e > 1 -> w = 1, truncated (clipped)
    # row 2: A = -1, log-ratios [-0.5, -0.2] -> rho = e^-0.7 = 0.496585 < 1 -> w = 0.496585
    # logp = -1 everywhere: loss = -w * A * logp = -w * A * -1 = w * A
    #   row 0: [1, 1]; row 1: [-1, -1]; row 2: [-0.496585, -0.496585]
    # gradient = -w * A: row 0 [-1, -1]; row 1 [1, 1]; row 2 [0.496585, 0.496585]
    logp = torch.full((3, 2), -1.0, requires_grad=True)
    old = logp.detach() - t([[0.5, 0.5], [0.5, 0.5], [-0.5, -0.2]])
    adv = t([[1.0, 1.0], [-1.0, -1.0], [-1.0, -1.0]])
    loss, clipped = topr(logp, old, adv, m([[1, 1]] * 3))
    loss.sum().backward()
    torch.testing.assert_close(loss, t([[1.0, 1.0], [-1.0, -1.0], [-0.496585, -0.496585]]))
    torch.testing.assert_close(clipped, t([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))
    torch.testing.assert_close(logp.grad, t([[-1.0, -1.0], [1.0, 1.0], [0.496585, 0.496585]]))


def test_topr_ignores_padding_in_the_sequence_ratio_and_never_overflows():
    # A = -1; valid log-ratio -0.5 only (padding holds +1000) -> rho = e^-0.5 = 0.606531
    # logp -2: loss = -0.606531 * -1 * -2 = -1.213061
    logp = t([[-2.0, -2.0]]).requires_grad_()
    old = t([[-1.5, -1002.0]])
    loss, clipped = topr(logp, old, t([[-1.0, -1.0]]), m([[1, 0]]))
    torch.testing.assert_close(loss, t([[-1.213061, 0.0]]))
    assert clipped.sum() == 0
    # a huge positive sequence log-ratio is truncated to 1 without overflow
    loss, clipped = topr(logp, t([[-1000.0, -1000.0]]), t([[-1.0, -1.0]]), m([[1, 1]]))
    torch.testing.assert_close(loss, t([[-2.0, -2.0]]))
    torch.testing.assert_close(clipped, t([[1.0, 1.0]]))


# ---------------------------------------------------------------- pg, entropy


def test_pg_is_minus_advantage_times_logp():
    # A [2, -1, 5 (padding)], logp [-0.5, -2, -3]: loss [-2 * -0.5, 1 * -2, 0] = [1, -2, 0]
    # gradient -A: [-2, 1, 0]
    logp = t([[-0.5, -2.0, -3.0]]).requires_grad_()
    loss, clipped = pg(logp, torch.zeros(1, 3), t([[2.0, -1.0, 5.0]]), m([[1, 1, 0]]))
    loss.sum().backward()
    torch.testing.assert_close(loss, t([[1.0, -2.0, 0.0]]))
    torch.testing.assert_close(logp.grad, t([[-2.0, 1.0, 0.0]]))
    assert clipped.sum() == 0


def test_entropy_bonus_is_a_negative_loss():
    # coef 0.01: -0.01 * [2, 0.5] = [-0.02, -0.005]; minimising it raises entropy
    torch.testing.assert_close(entropy_bonus(t([[2.0, 0.5]]), coef=0.01), t([[-0.02, -0.005]]))


@pytest.mark.parametrize("name", ["ppo", "gspo", "cispo", "topr", "pg", "gmpo", "sapo"])
def test_every_loss_is_finite_zero_outside_the_mask_and_pushes_logp_up_for_positive_advantage(name):
    # on-policy (rho = 1), A = 1 on valid tokens: descent direction -grad must be > 0 on valid tokens
    logp = t([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]]).requires_grad_()
    mask = m([[1, 1, 0], [0, 0, 0]])
    loss, clipped = POLICY_LOSSES[name](logp, logp.detach(), torch.ones(2, 3), mask)
    assert loss.shape == clipped.shape == (2, 3)
    assert torch.isfinite(loss).all()
    assert (loss[~mask] == 0).all() and (clipped[~mask] == 0).all()
    loss.sum().backward()
    assert (logp.grad[mask] < 0).all() and (logp.grad[~mask] == 0).all()


@pytest.mark.parametrize("name", ["ppo", "gspo", "cispo", "topr", "pg", "gmpo", "sapo", "nft"])
def test_signature_is_the_common_one_with_keyword_only_hyper_parameters(name):
    fn = POLICY_LOSSES[name]
    params = list(inspect.signature(fn).parameters.values())
    assert [p.name for p in params[:4]] == ["logp_B_T", "old_logp_B_T", "adv_B_T", "mask_B_T"]
    inputs = [p for p in params[4:] if p.kind is not inspect.Parameter.KEYWORD_ONLY]  # nft: its group_rewards inputs
    assert [p.name for p in inputs] == list(fn.inputs[4:])
    assert all(p.default is not p.empty for p in params[4 + len(inputs) :])
    assert ("arXiv:" in fn.__doc__ or "Williams 1992" in fn.__doc__) and "Deviations" in fn.__doc__


# ---------------------------------------------------------------- gmpo


def test_gmpo_clips_each_log_ratio_then_takes_the_geometric_mean():
    # clip 0.4 either side, in log space
    # seq 0, A = 1:  d = [0.5, -0.1, 0.2] -> min(d, clip(d)) = [0.4, -0.1, 0.2]   (0.5 clipped; -0.1 would be kept even
    #                below -0.4: A > 0 only clips upwards) -> mean 0.5 / 3 -> s = e^(1/6) = 1.181360 -> loss -1.181360
    # seq 1, A = -2: d = [-0.6, 0.3, pad] -> max(d, clip(d)) = [-0.4, 0.3] -> mean -0.05 -> s = e^-0.05 = 0.951229
    #                -> loss 2 * 0.951229 = 1.902459 on its two tokens
    old = torch.full((2, 3), -2.0)
    logp = (old + t([[0.5, -0.1, 0.2], [-0.6, 0.3, 0.0]])).requires_grad_()
    mask = m([[1, 1, 1], [1, 1, 0]])
    adv = t([[1.0, 1.0, 1.0], [-2.0, -2.0, 0.0]])
    loss, clipped = gmpo(logp, old, adv, mask)
    torch.testing.assert_close(loss, t([[-1.181360] * 3, [1.902459, 1.902459, 0.0]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(clipped, t([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    # seq_mean_token_mean gives 1/2 * (-s0 + 2 s1); d/d logp_t = 1/2 * (-A_i) * s_i / |y_i| where unclipped:
    #   seq 0: 0 (clipped), -1/2 * 1.181360 / 3 = -0.196893 (twice)
    #   seq 1: 0 (clipped), 1/2 * 2 * 0.951229 / 2 = 0.475615
    seq_mean_token_mean(loss, mask, num_seqs=2).backward()
    torch.testing.assert_close(logp.grad, t([[0.0, -0.196893, -0.196893], [0.0, 0.475615, 0.0]]), atol=1e-5, rtol=0)


def test_gmpo_on_policy_is_the_sequence_advantage():
    # all ratios 1: s = 1, loss -A_i on every valid token; an all-padding row is 0
    logp = t([[-1.0, -2.0], [-1.0, -1.0]])
    loss, clipped = gmpo(logp, logp, t([[0.5, 0.5], [3.0, 3.0]]), m([[1, 1], [0, 0]]))
    torch.testing.assert_close(loss, t([[-0.5, -0.5], [0.0, 0.0]]))
    assert clipped.sum() == 0
    # a zero-advantage sequence far off policy: loss 0 and nothing counted as clipped
    loss, clipped = gmpo(logp + 1.0, logp, torch.zeros(2, 2), m([[1, 1], [1, 1]]))
    assert (loss == 0).all() and clipped.sum() == 0


# ---------------------------------------------------------------- sapo


def test_sapo_gates_the_ratio_with_a_sigmoid():
    # tau_pos 1, tau_neg 1.05; f = sigmoid(tau (r - 1)) * 4 / tau, loss = -f A
    # a: r 1.0, A  1: f = 0.5 * 4 = 2                        -> loss -2
    # b: r 1.5, A  1: f = sigmoid(0.5) * 4 = 2.489837         -> loss -2.489837
    # c: r 0.5, A -1: f = sigmoid(-0.525) * 4 / 1.05 = 1.415938 -> loss 1.415938
    logp, old = logps_with_ratios([1.0, 1.5, 0.5])
    loss, clipped = sapo(logp, old, t([[1.0, 1.0, -1.0]]), m([[1, 1, 1]]))
    torch.testing.assert_close(loss, t([[-2.0, -2.489837, 1.415938]]), atol=1e-5, rtol=0)
    assert clipped.sum() == 0
    # d loss / d logp = -A * 4 sigmoid (1 - sigmoid) * r: a -1 (the plain policy gradient at r = 1),
    # b -4 * 0.622459 * 0.377541 * 1.5 = -1.410022, c +4 * 0.371684 * 0.628316 * 0.5 = 0.467070
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, t([[-1.0, -1.410022, 0.467070]]), atol=1e-5, rtol=0)


def test_sapo_gate_attenuates_far_from_one_and_rejects_a_non_positive_temperature():
    # the gradient weight 4 sigmoid (1 - sigmoid) r at r = 5 with tau 1: 4 * 0.982014 * 0.017986 * 5 = 0.353254 < 1
    logp, old = logps_with_ratios([5.0])
    loss, _ = sapo(logp, old, t([[1.0]]), m([[1]]))
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, t([[-0.353254]]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="tau_pos=0"):
        sapo(logp, old, t([[1.0]]), m([[1]]), tau_pos=0.0)


# ---------------------------------------------------------------- nft


def test_nft_matches_hand_computed_values_and_gradients():
    # prompt weight 1 - r_q (the authors' normalize=1), clamp_negative 1, clamp_positive 0
    # row 0: right, r_q 0.5, R = [1, 2]:  pos = -log R = [0, -0.693147]; x 0.5 -> [0, -0.346574]
    #        grad of -log R is -1 per token, x 0.5 -> [-0.5, -0.5]
    # row 1: wrong, r_q 0.25, R = [1, 0.5]: proxy (1 - 0.25 R) / 0.75 = [1, 1.166667] -> -log = [0, -0.154151] x 0.75
    #        = [0, -0.115613]; grad -(1/proxy) * d proxy = (0.25 R / 0.75) / proxy: [1/3, 0.142857],
    #        x 0.75 = [0.25, 0.107143]
    # row 2: wrong, r_q 0.25, R = [2, 1]: proxy [0.666667, 1] < 1 is clamped to 1 (value 0), its gradient kept:
    #        (0.25 * 2 / 0.75) / 1 = 0.666667 x 0.75 = 0.5; token 1 as row 1's first: 0.25
    old = torch.full((3, 2), -1.0)
    logp = (old + torch.log(t([[1.0, 2.0], [1.0, 0.5], [2.0, 1.0]]))).requires_grad_()
    rewards, rates = t([1.0, 0.0, 0.0]), t([0.5, 0.25, 0.25])
    loss, clamped = nft(logp, old, torch.zeros(3, 2), m([[1, 1]] * 3), rewards, rates)
    torch.testing.assert_close(loss, t([[0.0, -0.346574], [0.0, -0.115613], [0.0, 0.0]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(clamped, t([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]))
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, t([[-0.5, -0.5], [0.25, 0.107143], [0.5, 0.25]]), atol=1e-5, rtol=0)


def test_nft_on_policy_has_the_gradient_of_dr_grpo_and_with_the_grpo_weight_of_grpo():
    # R = 1: with w = 1 - r_q the gradient is -(c - r_q), Dr. GRPO's centred reward; with w = sqrt((1 - r_q) / r_q)
    # it is -(c - r_q) / sqrt(r_q (1 - r_q)), GRPO's (with the population std of the group's 0/1 rewards)
    # group accuracy 0.25: right -> -(0.75), wrong -> +0.25;
    # with the grpo weight -0.75 / 0.433013 = -1.732051 and 0.25 / 0.433013 = 0.577350
    logp = torch.full((2, 1), -1.0, requires_grad=True)
    rewards, rates = t([1.0, 0.0]), t([0.25, 0.25])
    loss, _ = nft(logp, logp.detach(), torch.zeros(2, 1), m([[1], [1]]), rewards, rates)
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, t([[-0.75], [0.25]]))
    logp.grad = None
    loss, _ = nft(logp, logp.detach(), torch.zeros(2, 1), m([[1], [1]]), rewards, rates, prompt_weight="grpo")
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, t([[-1.732051], [0.577350]]), atol=1e-5, rtol=0)


def test_nft_with_no_negative_weight_is_rejection_sampling_fine_tuning():
    # neg_weight 0 (the authors' RFT): a wrong answer contributes nothing, padding nothing, in any aggregation
    logp = torch.full((2, 2), -1.0, requires_grad=True)
    loss, _ = nft(logp, logp.detach() - 0.3, torch.zeros(2, 2), m([[1, 1], [1, 0]]), t([0.0, 1.0]), t([0.5, 0.5]),
                  neg_weight=0.0, prompt_weight="none")  # fmt: skip
    assert (loss[0] == 0).all() and loss[1, 1] == 0
    seq_mean_token_sum_norm(loss, m([[1, 1], [1, 0]]), num_seqs=2, max_len=2).backward()
    assert (logp.grad[0] == 0).all() and logp.grad[1, 0] < 0 and logp.grad[1, 1] == 0
    with pytest.raises(ValueError, match=r"rewards outside \[0, 1\]"):
        nft(logp, logp.detach(), torch.zeros(2, 2), m([[1, 1]] * 2), t([0.0, 2.0]), t([0.5, 0.5]))
    with pytest.raises(ValueError, match="prompt_weight='dr'"):
        nft(logp, logp.detach(), torch.zeros(2, 2), m([[1, 1]] * 2), t([0.0, 1.0]), t([0.5, 0.5]), prompt_weight="dr")
