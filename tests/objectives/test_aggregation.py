"""Loss aggregations: hand-computed values and invariance to micro-batching along B."""

import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from posttrain.objectives.aggregation import seq_mean_token_mean, seq_mean_token_sum_norm, token_mean
from posttrain.objectives.registry import AGGREGATIONS

LOSS_B_T = torch.arange(12.0).view(4, 3)
# row 3 is all padding
MASK_B_T = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
COUNTS = {"num_tokens": 6, "num_seqs": 4, "max_len": 3}


def call(name: str, loss_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
    """Call an aggregation the way the loop does: with only the step-wide counts its signature names."""
    fn = AGGREGATIONS[name]
    wanted = inspect.signature(fn).parameters
    return fn(loss_B_T, mask_B_T, **{k: v for k, v in COUNTS.items() if k in wanted})


def test_registered_names():
    assert {"token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"} <= set(AGGREGATIONS)


def test_token_mean_does_not_depend_on_micro_batching():
    # kept tokens 0, 1 | 3 | 6, 7, 8 -> 25 over 6 tokens
    whole = token_mean(LOSS_B_T, MASK_B_T, num_tokens=6)
    halves = sum(token_mean(LOSS_B_T[i : i + 2], MASK_B_T[i : i + 2], num_tokens=6) for i in (0, 2))
    assert whole.item() == pytest.approx(25 / 6)
    torch.testing.assert_close(halves, whole)


def test_seq_mean_token_mean_matches_hand_computation():
    # row means: (0 + 1) / 2 = 0.5 | 3 / 1 = 3 | (6 + 7 + 8) / 3 = 7 | padding row 0
    # (0.5 + 3 + 7 + 0) / 4 sequences = 10.5 / 4 = 2.625
    assert seq_mean_token_mean(LOSS_B_T, MASK_B_T, num_seqs=4).item() == pytest.approx(2.625)


def test_seq_mean_token_sum_norm_matches_hand_computation():
    # token sums 1 | 3 | 21 | 0 = 25, over max_len 3 and 4 sequences: 25 / 12 = 2.083333
    assert seq_mean_token_sum_norm(LOSS_B_T, MASK_B_T, num_seqs=4, max_len=3).item() == pytest.approx(25 / 12)


@pytest.mark.parametrize("name", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_every_aggregation_is_a_sum_over_micro_batches(name):
    whole = call(name, LOSS_B_T, MASK_B_T)
    # micro-batches of 1, 2 and 3 rows (the last part of each split holds the all-padding row)
    for size in (1, 2, 3):
        parts = [call(name, LOSS_B_T[i : i + size], MASK_B_T[i : i + size]) for i in range(0, 4, size)]
        torch.testing.assert_close(sum(parts), whole)
    # a micro-batch made only of the all-padding row contributes exactly 0
    assert call(name, LOSS_B_T[3:], MASK_B_T[3:]).item() == 0.0


@pytest.mark.parametrize("name", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_padding_values_never_leak(name):
    # NaN and inf in padded positions are ignored, and so is their gradient
    loss_B_T = LOSS_B_T.clone()
    loss_B_T[~MASK_B_T] = float("nan")
    loss_B_T[0, 2] = float("inf")
    loss_B_T.requires_grad_()
    value = call(name, loss_B_T, MASK_B_T)
    torch.testing.assert_close(value, call(name, LOSS_B_T, MASK_B_T))
    value.backward()
    assert (loss_B_T.grad[~MASK_B_T] == 0).all()


def test_token_mean_of_a_step_without_tokens_is_zero():
    assert token_mean(torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.bool), num_tokens=0).item() == 0.0


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=8),
    split=st.integers(min_value=1, max_value=8),
    seed=st.integers(min_value=0, max_value=1000),
)
def test_micro_batch_invariance_on_random_batches(lengths, split, seed):
    generator = torch.Generator().manual_seed(seed)
    loss_B_T = torch.randn(len(lengths), 5, generator=generator, dtype=torch.float64)
    mask_B_T = torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]
    counts = {"num_tokens": int(mask_B_T.sum()), "num_seqs": len(lengths), "max_len": 5}
    for fn, names in (
        (token_mean, ("num_tokens",)),
        (seq_mean_token_mean, ("num_seqs",)),
        (seq_mean_token_sum_norm, ("num_seqs", "max_len")),
    ):
        kwargs = {k: counts[k] for k in names}
        whole = fn(loss_B_T, mask_B_T, **kwargs)
        parts = sum(
            fn(loss_B_T[i : i + split], mask_B_T[i : i + split], **kwargs)
            for i in range(0, len(lengths), split)
        )
        torch.testing.assert_close(parts, whole)
