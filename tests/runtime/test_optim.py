"""Learning-rate schedule values by hand, AdamW parameter groups, scheduler wiring."""

import itertools
import math

import pytest
import torch

from posttrain.runtime.optim import build_adamw, build_scheduler, lr_multiplier, lr_of_last_step


def mult(step: int, schedule: str, *, warmup: int = 4, total: int = 14, min_ratio: float = 0.1) -> float:
    return lr_multiplier(step, warmup_steps=warmup, total_steps=total, schedule=schedule, min_ratio=min_ratio)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_is_linear_from_lr_over_warmup(schedule: str) -> None:
    # warmup 4: steps 0..3 -> 1/4, 2/4, 3/4, 4/4
    assert [mult(s, schedule) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_by_hand() -> None:
    # warmup 4, total 14: progress = (step - 4) / 10; m = 0.1 + 0.9 * 0.5 * (1 + cos(pi * progress))
    assert mult(4, "cosine") == pytest.approx(1.0)  # progress 0
    assert mult(9, "cosine") == pytest.approx(0.55)  # progress 0.5: 0.1 + 0.45 * (1 + 0)
    # progress 0.25: cos(pi/4) = 0.707107 -> 0.1 + 0.45 * 1.707107 = 0.868198
    assert mult(6.5, "cosine") == pytest.approx(0.868198, abs=1e-6)
    assert mult(14, "cosine") == pytest.approx(0.1)  # progress 1
    assert mult(50, "cosine") == pytest.approx(0.1)  # clamped past the end


def test_linear_by_hand() -> None:
    # m = 1 - 0.9 * progress
    assert mult(4, "linear") == pytest.approx(1.0)
    assert mult(6, "linear") == pytest.approx(0.82)  # progress 0.2: 1 - 0.18
    assert mult(9, "linear") == pytest.approx(0.55)  # progress 0.5: 1 - 0.45
    assert mult(14, "linear") == pytest.approx(0.1)
    assert mult(30, "linear") == pytest.approx(0.1)


def test_constant_and_no_warmup() -> None:
    assert [mult(s, "constant") for s in (4, 9, 100)] == [1.0, 1.0, 1.0]
    # warmup 0: step 0 is already at full lr; linear with min_ratio 0 reaches 0 at total
    assert mult(0, "linear", warmup=0, total=10, min_ratio=0.0) == 1.0
    assert mult(5, "linear", warmup=0, total=10, min_ratio=0.0) == pytest.approx(0.5)
    assert mult(10, "linear", warmup=0, total=10, min_ratio=0.0) == pytest.approx(0.0)


def test_warmup_longer_than_the_run_does_not_divide_by_zero() -> None:
    # total 3 <= warmup 4: progress = (step - 4) / max(1, 3 - 4) = step - 4, clamped to 1
    assert mult(4, "cosine", total=3) == pytest.approx(1.0)  # progress 0
    assert mult(5, "cosine", total=3) == pytest.approx(0.1)  # progress 1


def test_unknown_schedule() -> None:
    with pytest.raises(ValueError, match="cosine, linear, constant"):
        mult(10, "step")


def test_scheduler_sets_the_optimizer_lr() -> None:
    param = torch.nn.Parameter(torch.zeros(2, 2))
    opt = build_adamw([param], lr=0.1, weight_decay=0.0, betas=(0.9, 0.999))
    sched = build_scheduler(opt, warmup_steps=2, total_steps=4, schedule="linear", min_ratio=0.0)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # steps 0, 1 warm up: 0.1 * 1/2, 0.1 * 2/2; step 2: progress 0 -> 0.1; step 3: progress 1/2 -> 0.05
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.05])


def test_the_logged_lr_is_the_one_the_last_update_used() -> None:
    param = torch.nn.Parameter(torch.zeros(2, 2))
    opt = build_adamw([param], lr=0.1, weight_decay=0.0, betas=(0.9, 0.999))
    sched = build_scheduler(opt, warmup_steps=4, total_steps=8, schedule="constant", min_ratio=0.0)
    used, logged = [], []
    for _ in range(3):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        logged.append(lr_of_last_step(sched))
    # warm-up over 4 steps: 0.1 * 1/4, 2/4, 3/4 (the schedule itself already reads 0.1 * 4/4 after step 3)
    assert used == pytest.approx([0.025, 0.05, 0.075])
    assert logged == pytest.approx(used)
    assert sched.get_last_lr()[0] == pytest.approx(0.1)


def test_adamw_groups_exclude_1d_params_from_weight_decay() -> None:
    layer = torch.nn.Linear(3, 2)
    frozen = torch.nn.Parameter(torch.zeros(4, 4), requires_grad=False)
    opt = build_adamw([layer.weight, layer.bias, frozen], lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    groups = [(g["weight_decay"], [p.shape for p in g["params"]]) for g in opt.param_groups]
    assert groups == [(0.1, [torch.Size([2, 3])]), (0.0, [torch.Size([2])])]
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_adamw([frozen], lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999))


def test_fused_adamw_takes_the_same_steps_as_the_plain_one() -> None:
    torch.manual_seed(0)
    weight, bias = torch.randn(5, 3), torch.randn(5)
    layers = [torch.nn.Linear(3, 5), torch.nn.Linear(3, 5)]
    for layer in layers:
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    fused = build_adamw(layers[0].parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    assert all(g["fused"] for g in fused.param_groups)
    groups = [{"params": [layers[1].weight], "weight_decay": 0.1}, {"params": [layers[1].bias], "weight_decay": 0.0}]
    plain = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), foreach=False)  # the for-loop reference
    for step in range(5):
        x = torch.linspace(-1, 1, 12).view(4, 3) * (step + 1)
        for layer, opt in zip(layers, (fused, plain), strict=True):
            opt.zero_grad()
            layer(x).square().sum().backward()
            opt.step()
    torch.testing.assert_close(layers[0].weight, layers[1].weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layers[0].bias, layers[1].bias, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(layers[0].weight, weight, atol=1e-3)  # five steps of lr 1e-2 moved it


def test_cosine_is_monotone_after_warmup() -> None:
    values = [mult(s, "cosine") for s in range(4, 15)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert not math.isclose(values[0], values[-1])
