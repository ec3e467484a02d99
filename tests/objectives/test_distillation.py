"""Distillation objectives: GKD's generalised JSD against hand-computed values, the vocabulary-chunked form
against the whole-logits one (values and gradients), and on-policy reverse KL's value and gradient.

Two-token vocabulary: student logits [0, 0] -> Q = [1/2, 1/2]; teacher logits [ln 3, 0] -> P = [3/4, 1/4].
    KL(P || Q) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.130812
    KL(Q || P) = 1/2 ln(2/3) + 1/2 ln 2   = 0.143841
    beta 0.5: M = [5/8, 3/8]; KL(P || M) = 3/4 ln(6/5) + 1/4 ln(2/3) = 0.035375,
              KL(Q || M) = 1/2 ln(4/5) + 1/2 ln(4/3) = 0.032269; JSD = (0.035375 + 0.032269) / 2 = 0.033822
    beta 0.3: M = 0.3 P + 0.7 Q = [0.575, 0.425]; JSD = 0.3 KL(P || M) + 0.7 KL(Q || M) = 0.027951
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from posttrain.objectives.distillation import generalized_jsd, gkd, reverse_kl
from posttrain.objectives.registry import DISTILLATION_LOSSES


def t(values) -> Tensor:
    return torch.tensor(values, dtype=torch.float32)


STUDENT, TEACHER = t([[0.0, 0.0]]), t([[math.log(3.0), 0.0]])


def test_registered_names_and_needs():
    assert DISTILLATION_LOSSES["gkd"] is gkd and gkd.needs == ("distributions",)
    assert DISTILLATION_LOSSES["reverse_kl"] is reverse_kl
    assert reverse_kl.needs == ("token_logprobs", "on_policy")


@pytest.mark.parametrize(("beta", "expected"), [(0.0, 0.130812), (1.0, 0.143841), (0.5, 0.033822), (0.3, 0.027951)])
def test_generalized_jsd_matches_hand_computed_values(beta, expected):
    assert generalized_jsd(STUDENT, TEACHER, beta=beta).item() == pytest.approx(expected, abs=1e-6)


def test_temperature_divides_both_models_logits():
    # logits doubled at temperature 2 are the original distributions
    assert generalized_jsd(2 * STUDENT, 2 * TEACHER, beta=0.5, temperature=2.0).item() == pytest.approx(0.033822,
                                                                                                      abs=1e-6)


def test_gkd_with_the_heads_of_the_two_token_example():
    # hidden 1-d, heads [[0], [0]] and [[ln 3], [0]] give the logits above
    value = gkd(t([[1.0]]), t([[0.0], [0.0]]), t([[1.0]]), t([[math.log(3.0)], [0.0]]), beta=0.5)
    assert value.item() == pytest.approx(0.033822, abs=1e-6)


def _models(vocab: int = 37, hidden: int = 6, teacher_hidden: int = 5, n: int = 9):
    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(n, hidden, generator=g, dtype=torch.float64)
    w_s = torch.randn(vocab, hidden, generator=g, dtype=torch.float64)
    b_s = torch.randn(vocab, generator=g, dtype=torch.float64)
    h_t = torch.randn(n, teacher_hidden, generator=g, dtype=torch.float64)
    w_t = torch.randn(vocab, teacher_hidden, generator=g, dtype=torch.float64)
    b_t = torch.randn(vocab, generator=g, dtype=torch.float64)
    return h_s, w_s, b_s, h_t, w_t, b_t


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_chunked_gkd_equals_the_whole_logits_divergence_and_its_gradients(beta):
    h_s, w_s, b_s, h_t, w_t, b_t = _models()
    leaves = [x.clone().requires_grad_() for x in (h_s, w_s, b_s)]
    chunked = gkd(*leaves[:2], h_t, w_t, student_bias_V=leaves[2], teacher_bias_V=b_t, beta=beta,
                  temperature=0.7, chunk=8)  # fmt: skip
    weights = torch.linspace(0.5, 1.5, len(chunked), dtype=torch.float64)
    (chunked * weights).sum().backward()
    plain_leaves = [x.clone().requires_grad_() for x in (h_s, w_s, b_s)]
    student_logits = plain_leaves[0] @ plain_leaves[1].T + plain_leaves[2]
    plain = generalized_jsd(student_logits.double(), (h_t @ w_t.T + b_t).double(), beta=beta, temperature=0.7)
    (plain.double() * weights).sum().backward()
    torch.testing.assert_close(chunked.double(), plain.double(), atol=1e-5, rtol=1e-5)
    for got, want in zip(leaves, plain_leaves, strict=True):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=1e-5)


def test_gkd_between_equal_distributions_is_zero_with_zero_gradient():
    h_s, w_s, *_ = _models()
    hidden = h_s.clone().requires_grad_()
    value = gkd(hidden, w_s, h_s, w_s, beta=0.5, chunk=8)
    value.sum().backward()
    torch.testing.assert_close(value, torch.zeros_like(value), atol=1e-6, rtol=0)
    torch.testing.assert_close(hidden.grad, torch.zeros_like(hidden.grad), atol=1e-6, rtol=0)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_a_gradient_step_moves_the_student_towards_the_teacher(beta):
    h_s, w_s, _, h_t, w_t, _ = _models()
    head = w_s.clone().requires_grad_()
    before = gkd(h_s, head, h_t @ w_t.T @ w_s.pinverse().T, w_s, beta=beta, chunk=8)  # a reachable teacher
    before.sum().backward()
    with torch.no_grad():
        after = gkd(h_s, head - 0.01 * head.grad, h_t @ w_t.T @ w_s.pinverse().T, w_s, beta=beta, chunk=8)
    assert after.sum() < before.sum()


def test_gkd_refuses_heads_of_two_vocabularies():
    h_s, w_s, _, h_t, w_t, _ = _models()
    with pytest.raises(ValueError, match="one vocabulary"):
        gkd(h_s, w_s, h_t, w_t[:-1])


def test_gkd_refuses_beta_outside_0_1():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        generalized_jsd(STUDENT, TEACHER, beta=1.5)


def test_reverse_kl_value_is_the_sampled_token_estimate_and_its_gradient_the_score_function():
    # k = logp - teacher = [-1 + 1.5, -2 + 1] = [0.5, -1]; d loss / d logp = k
    logp = t([-1.0, -2.0]).requires_grad_()
    value = reverse_kl(logp, t([-1.5, -1.0]))
    value.sum().backward()
    torch.testing.assert_close(value.detach(), t([0.5, -1.0]))
    torch.testing.assert_close(logp.grad, t([0.5, -1.0]))
