"""NonFiniteGuard: a finite update is clipped and applied; a NaN/inf loss or gradient is skipped, counted
and logged; `max_bad_steps` skipped in a row stop the run and leave the checkpoints alone."""

import logging
import math
import warnings
from pathlib import Path

import pytest
import torch

from posttrain.runtime.checkpoint import Checkpointer
from posttrain.runtime.guards import NonFiniteGuard, TrainingStopped, step_schedule, total_norm


def param_with_grad(grad: list[float]) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    p.grad = torch.tensor(grad)
    return p


def test_a_finite_update_is_clipped_and_applied():
    p = param_with_grad([3.0, 4.0])  # norm 5
    guard = NonFiniteGuard(5)
    norm = guard.step([p], torch.optim.SGD([p], lr=0.1), max_grad_norm=1.0, loss=2.0)
    # clipped to norm 1: grad [0.6, 0.8]; SGD: [1 - 0.06, 2 - 0.08]
    assert norm == pytest.approx(5.0)
    torch.testing.assert_close(p.data, torch.tensor([0.94, 1.92]))
    assert p.grad is None and guard.skipped == 0


def test_fused_adamw_steps_on_the_clipped_gradients_and_only_when_clipping():
    # step 1: a gradient of norm 5 clipped to 1, i.e. divided by 5 + 1e-6 (clip_grad_norm_'s scale) inside the
    # fused kernel: AdamW's first moment is (1 - 0.9) * g / 5.000001. Step 2: a gradient of norm 0.5 is not
    # scaled: the moment becomes 0.9 * m1 + 0.1 * g2.
    gen = torch.Generator().manual_seed(0)
    g1, g2 = torch.randn(64, 32, generator=gen), torch.randn(64, 32, generator=gen)
    g1, g2 = g1 * (5 / g1.norm()), g2 * (0.5 / g2.norm())
    p = torch.nn.Parameter(torch.randn(64, 32, generator=gen))
    optimizer = torch.optim.AdamW([p], lr=0.1, fused=True)
    guard = NonFiniteGuard(5)
    p.grad = g1.clone()
    assert guard.step([p], optimizer, max_grad_norm=1.0) == pytest.approx(5.0)
    m1 = 0.1 * g1 / (5 + 1e-6)
    torch.testing.assert_close(optimizer.state[p]["exp_avg"], m1, rtol=1e-5, atol=1e-7)
    assert not hasattr(optimizer, "grad_scale")
    p.grad = g2.clone()
    guard.step([p], optimizer, max_grad_norm=1.0)
    torch.testing.assert_close(optimizer.state[p]["exp_avg"], 0.9 * m1 + 0.1 * g2, rtol=1e-5, atol=1e-7)


def test_total_norm_by_hand_and_where_float32_squares_overflow():
    # sqrt(3^2 + 4^2 + 12^2) = 13 over three tensors, one of them a transposed (non-contiguous) view
    grads = [torch.tensor([3.0]), torch.tensor([[4.0, 0.0], [0.0, 0.0]]).T, torch.tensor([12.0])]
    assert float(total_norm(grads)) == pytest.approx(13.0, rel=1e-7)
    assert float(total_norm([])) == 0.0
    # 3e19 and 4e19: float32 squares overflow, here as in torch's own norm, so the update would be skipped
    overflowing = [torch.tensor([3e19]), torch.tensor([4e19])]
    assert math.isinf(float(total_norm(overflowing))) and math.isinf(float(torch.nn.utils.get_total_norm(overflowing)))
    assert float(total_norm([torch.tensor([3e18]), torch.tensor([4e18])])) == pytest.approx(5e18, rel=1e-6)
    assert math.isinf(float(total_norm([torch.tensor([1.0, math.inf])])))
    assert math.isnan(float(total_norm([torch.tensor([1.0]), torch.tensor([math.nan])])))
    # other dtypes take torch's own norm: sqrt(1 + 4 * 4) in float64
    assert float(total_norm([torch.tensor([1.0, 4.0, 0.0], dtype=torch.float64).repeat(2)[:4]])) == pytest.approx(
        math.sqrt(1 + 16 + 0 + 1)
    )


def test_no_clipping_without_max_grad_norm():
    p = param_with_grad([3.0, 4.0])
    NonFiniteGuard(5).step([p], torch.optim.SGD([p], lr=0.1), max_grad_norm=None)
    torch.testing.assert_close(p.data, torch.tensor([0.7, 1.6]))  # [1 - 0.3, 2 - 0.4]


@pytest.mark.parametrize(
    ("grad", "loss", "found"),
    [
        ([math.nan, 1.0], 2.0, "loss 2.0, gradient norm nan"),
        ([math.inf, 1.0], None, "gradient norm inf"),
        ([3.0, 4.0], math.nan, "loss nan, gradient norm 5.0"),
        ([3.0, 4.0], math.inf, "loss inf, gradient norm 5.0"),
    ],
)
def test_a_non_finite_update_is_skipped_counted_and_logged(grad, loss, found, caplog):
    p = param_with_grad(grad)
    optimizer = torch.optim.AdamW([p], lr=0.1)
    guard = NonFiniteGuard(5)
    with caplog.at_level(logging.WARNING, logger="posttrain.train"):
        guard.step([p], optimizer, max_grad_norm=1.0, loss=loss, step=3)
    torch.testing.assert_close(p.data, torch.tensor([1.0, 2.0]))  # untouched
    assert len(optimizer.state) == 0  # no step was taken: Adam's moments never saw the NaN
    assert p.grad is None  # dropped, so the next step starts clean
    assert (guard.skipped, guard.in_a_row) == (1, 1)
    assert caplog.messages == [
        f"step 3: {found}; the optimiser update was skipped (1 in a row, 1 in this run; "
        "the run stops after train.max_bad_steps=5 in a row)"
    ]


def test_a_good_update_resets_the_run_of_bad_ones_but_not_the_total():
    p = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([p], lr=0.1)
    guard = NonFiniteGuard(2)
    for grad in ([math.nan, 0.0], [1.0, 1.0], [math.nan, 0.0], [1.0, 1.0]):  # never 2 bad in a row
        p.grad = torch.tensor(grad)
        guard.step([p], optimizer, max_grad_norm=None)
    assert (guard.skipped, guard.in_a_row) == (2, 0)
    torch.testing.assert_close(p.data, torch.tensor([-0.2, -0.2]))  # the two good updates of -0.1 each


def test_max_bad_steps_in_a_row_stop_the_run_and_name_the_kept_checkpoint(tmp_path: Path):
    checkpointer = Checkpointer(tmp_path)
    kept = checkpointer.save(2, save_model=lambda d: d.mkdir(), state={})
    p = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([p], lr=0.1)
    guard = NonFiniteGuard(3, checkpointer)
    for step in (3, 4):
        p.grad = torch.tensor([math.nan, 0.0])
        guard.step([p], optimizer, max_grad_norm=None, loss=1.0, step=step)
    p.grad = torch.tensor([math.nan, 0.0])
    with pytest.raises(TrainingStopped) as stopped:
        guard.step([p], optimizer, max_grad_norm=None, loss=1.0, step=5)
    message = str(stopped.value)
    assert message.startswith("step 5: 3 optimiser updates in a row had a non-finite loss or gradient")
    assert "train.max_bad_steps=3" in message and f"the newest checkpoint, {kept}, is kept" in message
    assert [c.name for c in checkpointer.root.iterdir()] == ["step-00000002"]
    torch.testing.assert_close(p.data, torch.zeros(2))


def test_stop_message_without_any_checkpoint():
    p = torch.nn.Parameter(torch.zeros(1))
    p.grad = torch.tensor([math.inf])
    with pytest.raises(TrainingStopped, match="no checkpoint had been written yet"):
        NonFiniteGuard(1).step([p], torch.optim.SGD([p], lr=0.1), max_grad_norm=None)


def test_the_count_continues_from_a_resumed_history():
    assert NonFiniteGuard(5, history=[{"step": 1, "skipped_steps": 0}, {"step": 2, "skipped_steps": 2}]).skipped == 2
    assert NonFiniteGuard(5, history=[]).skipped == 0
    with pytest.raises(ValueError, match="max_bad_steps must be >= 1"):
        NonFiniteGuard(0)


def test_the_schedule_advances_over_a_skipped_first_update_without_a_warning():
    p = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([p], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    p.grad = torch.tensor([math.nan])
    NonFiniteGuard(5).step([p], optimizer, max_grad_norm=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "lr_scheduler.step() before optimizer.step()" would raise
        step_schedule(scheduler)
    assert scheduler.get_last_lr() == [0.5]  # step 1 of 1 / (step + 1), though the optimiser never stepped
