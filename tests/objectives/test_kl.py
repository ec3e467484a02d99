"""KL estimators and the adaptive KL coefficient against hand-computed numbers."""

import pytest
import torch
from torch import Tensor

from posttrain.objectives.kl import adaptive_kl_coef, k1, k2, k3, k3_bias_corrected
from posttrain.objectives.registry import KL_ESTIMATORS


def t(values) -> Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_registered_names():
    assert {"k1", "k2", "k3", "k3_bias_corrected"} <= set(KL_ESTIMATORS)


# token 0: pi = 0.5, ref = 0.25 -> log r = log 0.25 - log 0.5 = -0.693147, r = 0.5
# token 1: logp - ref_logp = -0.5 -> log r = 0.5, r = e^0.5 = 1.648721
# token 2: logp - ref_logp = 0.5  -> log r = -0.5, r = e^-0.5 = 0.606531
LOGP = torch.log(t([[0.5, 0.2, 0.3]]))
REF_LOGP = torch.cat([torch.log(t([[0.25]])), LOGP[:, 1:2] + 0.5, LOGP[:, 2:3] - 0.5], dim=1)


def test_k1_is_minus_log_r():
    # -log r: 0.693147, -0.5, 0.5 (k1 can be negative)
    torch.testing.assert_close(k1(LOGP, REF_LOGP), t([[0.693147, -0.5, 0.5]]))


def test_k2_is_half_the_squared_log_ratio():
    # 0.5 * 0.693147^2 = 0.5 * 0.480453 = 0.240227; 0.5 * 0.25 = 0.125; 0.125
    torch.testing.assert_close(k2(LOGP, REF_LOGP), t([[0.240227, 0.125, 0.125]]))


def test_k3_is_r_minus_one_minus_log_r():
    # 0.5 - 1 + 0.693147 = 0.193147; 1.648721 - 1 - 0.5 = 0.148721; 0.606531 - 1 + 0.5 = 0.106531
    torch.testing.assert_close(k3(LOGP, REF_LOGP), t([[0.193147, 0.148721, 0.106531]]))


@pytest.mark.parametrize(("name", "grad"), [("k1", 1.0), ("k2", 0.0), ("k3", 0.0)])
def test_equal_log_probs_give_zero_kl(name, grad):
    # pi = ref: every estimator is 0. k2' = logp - ref = 0 and k3' = 1 - r = 0, but k1' = 1 always:
    # k1's gradient as a loss is not the KL's gradient, which is why k1 belongs in the reward.
    logp = t([[-1.0, -3.0]]).requires_grad_()
    kl = KL_ESTIMATORS[name](logp, logp.detach())
    kl.sum().backward()
    torch.testing.assert_close(kl, torch.zeros(1, 2))
    torch.testing.assert_close(logp.grad, torch.full((1, 2), grad))


def test_gradients_with_respect_to_logp():
    # token 0 (logp - ref = 0.693147, r = 0.5): k1' = 1;  k2' = logp - ref = 0.693147;
    #   k3' = d/dlogp [e^(ref - logp) - 1 - (ref - logp)] = -r + 1 = 0.5
    grads = []
    for fn in (k1, k2, k3):
        logp = LOGP[:, :1].clone().requires_grad_()
        fn(logp, REF_LOGP[:, :1]).sum().backward()
        grads.append(logp.grad.item())
    assert grads == pytest.approx([1.0, 0.693147, 0.5], abs=1e-6)


def test_k3_is_never_negative_and_stays_finite_far_from_the_reference():
    # log r = 0 - (-100) = 100 is clamped to 20: e^20 - 1 - 20 = 485165174.4 (finite, float32 ~ 4.851652e8)
    kl = k3(t([[-100.0, 0.0]]), t([[0.0, -100.0]]))
    assert torch.isfinite(kl).all() and (kl >= 0).all()
    assert kl[0, 0].item() == pytest.approx(485165174.4, rel=1e-6)
    # log r = -100 (not clamped): e^-100 - 1 + 100 = 99
    assert kl[0, 1].item() == pytest.approx(99.0)


def test_adaptive_kl_coef_follows_ziegler():
    # target 6, horizon 10000, n_steps 256 -> K = 0.0256
    # KL 9:   e = 9/6 - 1 = 0.5 -> clipped 0.2:   0.1 * (1 + 0.2 * 0.0256) = 0.1 * 1.00512 = 0.100512
    # KL 3:   e = -0.5 -> clipped -0.2:           0.1 * (1 - 0.00512) = 0.099488
    # KL 6.6: e = 0.1:                            0.1 * (1 + 0.1 * 0.0256) = 0.100256
    # KL 6:   e = 0:                              0.1
    kwargs = {"target": 6.0, "horizon": 10000, "n_steps": 256}
    assert adaptive_kl_coef(0.1, 9.0, **kwargs) == pytest.approx(0.100512)
    assert adaptive_kl_coef(0.1, 3.0, **kwargs) == pytest.approx(0.099488)
    assert adaptive_kl_coef(0.1, 6.6, **kwargs) == pytest.approx(0.100256)
    assert adaptive_kl_coef(0.1, 6.0, **kwargs) == pytest.approx(0.1)
    # a 0-dim tensor KL gives a tensor coefficient with the same value
    new = adaptive_kl_coef(0.1, torch.tensor(9.0), **kwargs)
    assert isinstance(new, Tensor) and new.item() == pytest.approx(0.100512)


def test_k3_bias_corrected_is_the_ratio_to_the_sampler_times_k3():
    # token 0: pi = 0.5, pi_old = 0.4, ref = 0.25: rho = 0.5 / 0.4 = 1.25; k3 = 0.193147 -> 1.25 * 0.193147 = 0.241434
    # token 1: pi = pi_old (rho = 1), logp - ref = -0.5: k3 = 0.148721
    logp = LOGP[:, :2]
    old = torch.cat([torch.log(t([[0.4]])), LOGP[:, 1:2]], dim=1)
    torch.testing.assert_close(k3_bias_corrected(logp, REF_LOGP[:, :2], old), t([[0.241434, 0.148721]]))


def test_k3_bias_corrected_gradient_is_the_reverse_kls():
    # d/dlogp [rho * k3] = rho * k3 + rho * (1 - r), rho = exp(logp - old), r = ref / pi.
    # token 0 at rho = 1 (old = logp): 0.193147 + 0.5 = 0.693147 = logp - ref (k3 alone: 1 - r = 0.5);
    # at rho = 1.25 (old = log 0.4): 1.25 * (0.193147 + 0.5) = 0.866434
    for old, expected in ((LOGP[:, :1], 0.693147), (torch.log(t([[0.4]])), 0.866434)):
        logp = LOGP[:, :1].clone().requires_grad_()
        k3_bias_corrected(logp, REF_LOGP[:, :1], old).sum().backward()
        assert logp.grad.item() == pytest.approx(expected, abs=1e-6)
