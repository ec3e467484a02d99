"""Logit filters and token selection against hand-computed distributions."""

import math

import pytest
import torch

from posttrain.rollout.engine import SamplingParams
from posttrain.rollout.sampling import (
    draw_from,
    filter_logits,
    filter_min_p,
    filter_top_k,
    filter_top_p,
    invert_cdf,
    sample_tokens,
    scale_logits,
)

INF = float("-inf")


def logits_of(probs: list[float]) -> torch.Tensor:
    """[1, V] logits whose softmax is `probs`."""
    return torch.tensor([probs]).log()


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    torch.testing.assert_close(filter_top_k(logits, 2), torch.tensor([[INF, 4.0, 3.0, INF]]))
    torch.testing.assert_close(filter_top_k(logits, 0), logits)  # 0 is off


def test_top_p_keeps_smallest_set_reaching_p():
    # probs 0.5, 0.3, 0.15, 0.05; mass above each: 0, 0.5, 0.8, 0.95
    logits = logits_of([0.15, 0.5, 0.05, 0.3])
    # top_p 0.75: keep tokens with mass above < 0.75 -> the 0.5 and the 0.3
    kept = filter_top_p(logits, 0.75).isfinite()
    assert kept.tolist() == [[False, True, False, True]]
    # top_p 0.85: the 0.15 joins (mass above it 0.8 < 0.85)
    assert filter_top_p(logits, 0.85).isfinite().tolist() == [[True, True, False, True]]
    # top_p tiny: only the argmax survives
    assert filter_top_p(logits, 0.01).isfinite().tolist() == [[False, True, False, False]]


def test_min_p_drops_below_fraction_of_max():
    # max p 0.5; min_p 0.25 -> threshold 0.125: keeps 0.5, 0.3, 0.15; drops 0.05
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    assert filter_min_p(logits, 0.25).isfinite().tolist() == [[True, True, True, False]]
    # min_p 0.5 -> threshold 0.25: keeps 0.5, 0.3
    assert filter_min_p(logits, 0.5).isfinite().tolist() == [[True, True, False, False]]


def test_filters_chain_top_k_then_top_p_then_min_p():
    # top_k 3 leaves 0.4, 0.3, 0.2 (renormalised 4/9, 3/9, 2/9); top_p 0.7: masses above 0, 4/9, 7/9
    # -> keeps 4/9 and 3/9; min_p 0.8 of renormalised max 4/7 = 0.457: drops 3/7 -> only token 0
    params = SamplingParams(max_new_tokens=1, top_k=3, top_p=0.7, min_p=0.8)
    logits = logits_of([0.4, 0.3, 0.2, 0.1])
    assert filter_logits(logits, params).isfinite().tolist() == [[True, False, False, False]]
    params = SamplingParams(max_new_tokens=1, top_k=3, top_p=0.7, min_p=0.7)  # 0.7 * 4/7 = 0.4 < 3/7
    assert filter_logits(logits, params).isfinite().tolist() == [[True, True, False, False]]


def test_sampled_logprob_is_unfiltered_and_temperature_scaled():
    # T = 2: logits [2, 0, 0, -inf-ish] / 2 = [1, 0, 0]; log_softmax at 0 = 1 - log(e + 2)
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    params = SamplingParams(max_new_tokens=1, temperature=2.0, top_k=1)
    tokens, logp = sample_tokens(logits, params, torch.Generator().manual_seed(0))
    assert tokens.tolist() == [0]  # top_k 1 forces the argmax
    assert logp.item() == pytest.approx(1 - math.log(math.e + 2), abs=1e-6)  # not 0.0 = log 1 after filtering


def test_greedy_is_argmax_with_temperature_one_logprob():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    tokens, logp = sample_tokens(logits, SamplingParams(max_new_tokens=1, temperature=0.0))
    assert tokens.tolist() == [1, 0]
    expected = [3 - math.log(1 + math.e**3 + math.e), 5 - math.log(math.e**5 + 2)]
    torch.testing.assert_close(logp, torch.tensor(expected))


def test_sampling_follows_the_filtered_distribution_and_is_seeded():
    # top_p 0.75 over [0.5, 0.3, 0.15, 0.05] -> samples only from {0, 1} with odds 5:3
    logits = logits_of([0.5, 0.3, 0.15, 0.05]).expand(4000, 4)
    params = SamplingParams(max_new_tokens=1, top_p=0.75)
    tokens, _ = sample_tokens(logits, params, torch.Generator().manual_seed(3))
    counts = torch.bincount(tokens, minlength=4)
    assert counts[2:].sum() == 0
    assert counts[0].item() / 4000 == pytest.approx(5 / 8, abs=0.03)
    again, _ = sample_tokens(logits, params, torch.Generator().manual_seed(3))
    assert torch.equal(tokens, again)


def test_scale_logits_upcasts_to_float32():
    assert scale_logits(torch.ones(1, 3, dtype=torch.bfloat16), 0.5).dtype == torch.float32


@pytest.mark.parametrize(
    "field,value",
    [("max_new_tokens", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_k", -1), ("min_p", 1.0)],
)
def test_sampling_params_rejects_out_of_range(field: str, value: float):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{"max_new_tokens": 4, field: value})


def test_temperature_zero_means_greedy():
    assert SamplingParams(max_new_tokens=1, temperature=0.0).greedy
    assert not SamplingParams(max_new_tokens=1).greedy


def test_draw_from_draws_each_token_with_its_probability():
    # p = [0.1, 0.6, 0, 0.3] over 20000 draws: frequencies within 0.015 (about 3.5 standard errors of
    # sqrt(0.6 * 0.4 / 20000) = 0.0035), and the zero-probability token never wins
    probs = torch.tensor([[0.1, 0.6, 0.0, 0.3]]).expand(20000, 4)
    tokens = draw_from(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=4).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.6, 0.0, 0.3]), atol=0.015, rtol=0)
    assert freq[2] == 0


def test_invert_cdf_picks_the_first_token_whose_sum_exceeds_the_draw():
    # p = [0.125, 0.5, 0, 0.375] -> c = [0.125, 0.625, 0.625, 1.0] (exact in binary); u = U * 1.0:
    # u = 0 -> 0; u = 0.124 -> 0; u = 0.125 -> 1 (c_0 is not above it); u = 0.625 -> 3 (the p = 0 token 2 is skipped)
    cdf = torch.tensor([[0.125, 0.625, 0.625, 1.0]], dtype=torch.float64).repeat(4, 1)
    uniform = torch.tensor([[0.0], [0.124], [0.125], [0.625]], dtype=torch.float64)
    assert invert_cdf(cdf, uniform).tolist() == [0, 0, 1, 3]


def test_invert_cdf_never_draws_a_zero_probability_last_token():
    # the largest uniform torch.rand draws, 1 - 2^-53, against rows of many totals ending in a p = 0 token
    probs = torch.rand(1000, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    probs[:, 2] = 0.0
    uniform = torch.full((1000, 1), 1 - 2**-53, dtype=torch.float64)
    assert (invert_cdf(probs.cumsum(dim=-1), uniform) == 1).all()


def test_a_row_without_a_distribution_is_named():
    # row 1's logits hold a NaN, row 2's are all -inf: neither has probabilities to draw from
    logits = torch.zeros(3, 4)
    logits[1, 2] = float("nan")
    logits[2] = float("-inf")
    with pytest.raises(ValueError, match=r"rows \[1, 2\] have no next-token distribution"):
        sample_tokens(logits, SamplingParams(max_new_tokens=1), torch.Generator().manual_seed(0))
