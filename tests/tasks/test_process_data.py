"""The arithmetic task's stepwise rows: right traces are the worked demonstrations cut at `;`, a slip puts the
answer off by 10^column, and every step from the slip on is labelled wrong."""

from __future__ import annotations

import pytest

from posttrain.tasks import ArithmeticTask
from posttrain.tasks.arithmetic import verify, worked_completion
from posttrain.tasks.process_data import stepwise_rows, worked_steps

TASK = ArithmeticTask(digits=2, operators="+-")


def test_right_steps_joined_by_the_separator_are_the_worked_demonstration():
    for a, op, b in [(37, "+", 58), (73, "-", 58), (23, "-", 58), (4, "+", 3)]:
        steps, answer = worked_steps(a, op, b, columns=2)
        assert ";".join(steps) == worked_completion(a, op, b, columns=2)
        assert answer == (a + b if op == "+" else a - b)


def test_a_slip_is_carried_on_by_the_later_columns():
    # 37+58, units written 14 instead of 15: carry 1 still, tens 3+5+1=9 -> 94 = 95 - 1
    assert worked_steps(37, "+", 58, columns=2, slip=(0, -1)) == (["<think>7+8=14", "3+5+1=9</think>94"], 94)
    # units written 16: carry 1, answer 96; a tens slip moves the answer by 10
    assert worked_steps(37, "+", 58, columns=2, slip=(0, 1))[1] == 96
    assert worked_steps(37, "+", 58, columns=2, slip=(1, 1)) == (["<think>7+8=15", "3+5+1=10</think>105"], 105)
    # 23-58: "-" then 58-23; tens 5-0-2=3 written 4 -> -45
    assert worked_steps(23, "-", 58, columns=2, slip=(1, 1)) == (["<think>-", "8-3=5", "5-0-2=4</think>-45"], -45)


def test_rows_label_every_step_from_the_slip_on_wrong():
    rows = stepwise_rows(TASK, 400, seed=0)
    wrong_rows = 0
    for row in rows:
        labels, steps = row["labels"], row["completions"]
        assert len(labels) == len(steps) and labels == sorted(labels, reverse=True)  # right steps, then wrong ones
        answered_right = verify(";".join(steps), row["answer"])
        assert answered_right == all(labels)
        wrong_rows += not answered_right
        if steps[0] == "<think>-":
            assert labels[0]  # the sign step never slips
    assert 160 <= wrong_rows <= 240  # wrong_fraction 0.5 of 400 rows


def test_rows_are_seeded_and_keep_the_tasks_split():
    assert stepwise_rows(TASK, 20, seed=3) == stepwise_rows(TASK, 20, seed=3)
    eval_prompts = {r["prompt"] for r in stepwise_rows(TASK, 50, seed=0, split="eval")}
    assert not eval_prompts & {r["prompt"] for r in TASK.sample(2000, seed=0, split="train")}


def test_wrong_fraction_zero_gives_right_traces_only():
    assert all(all(r["labels"]) for r in stepwise_rows(TASK, 50, seed=0, wrong_fraction=0.0))


def test_multiplication_has_no_worked_steps():
    with pytest.raises(ValueError, match="\\+ and - only"):
        stepwise_rows(ArithmeticTask(digits=2, operators="+*"), 4, seed=0)
