"""Stepwise supervision from the arithmetic task's worked `<think>` steps, each step right or wrong, for a process
reward model (TRL's stepwise format: `prompt`, `completions` (the steps), `labels`).

The steps are the worked completion cut at its `;` separators, the answer in the last step:

    37+58=  ->  ["<think>7+8=15", "3+5+1=9</think>95"]                      labels [True, True]
    with a slip in the units column: ["<think>7+8=14", "3+5+1=9</think>94"]  labels [False, False]

A slip writes one column's result off by one, and the columns after it carry on from what was written, so the
answer is off by 10^column; from the slip on every step is labelled wrong: the trace can no longer reach the
right answer (Math-Shepherd's label, arXiv:2312.08935). The steps joined by `;` are exactly the text a policy
trained on the task's worked demonstrations writes (`arithmetic.worked_completion`), so a PRM trained with
`rm.step_separator: ";"` scores the policy's own steps (`rewards/process.py`).
"""

from __future__ import annotations

import random
from typing import Any

from posttrain.tasks.arithmetic import OPERATORS, THINK_CLOSE, THINK_OPEN, ArithmeticTask, Split

STEP_SEPARATOR = ";"
"""What separates the worked steps (`arithmetic.worked_completion`)."""


def worked_steps(a: int, op: str, b: int, *, columns: int,
                 slip: tuple[int, int] | None = None) -> tuple[list[str], int]:  # fmt: skip
    """The worked steps of `a op b` and the answer they arrive at. `slip` (column, +1 or -1): that column's
    written result is off by one (a digit kept within 0..9 for subtraction), and the later columns carry on from it.
    """
    if op not in ("+", "-"):
        raise ValueError(f"worked steps cover + and - only, not {op!r}")
    negative = op == "-" and a < b
    top, bottom = (b, a) if negative else (a, b)
    texts, digits, carry = [], [], 0
    for i, (x, y) in enumerate(zip(_digits(top, columns), _digits(bottom, columns), strict=True)):
        shift = slip[1] if slip is not None and slip[0] == i else 0
        if op == "+":
            total = x + y + carry + shift
            texts.append(f"{x}+{y}={total}" if i == 0 else f"{x}+{y}+{carry}={total}")
            digits.append(total % 10)
            carry = total // 10
        else:
            lends = x - carry < y
            difference = 10 * lends + x - carry - y + shift
            head = f"1{x}" if lends else f"{x}"
            texts.append(f"{head}-{y}={difference}" if i == 0 else f"{head}-{carry}-{y}={difference}")
            digits.append(difference)
            carry = int(lends)
    value = sum(d * 10**i for i, d in enumerate(digits)) + (carry * 10**columns if op == "+" else 0)
    answer = -value if negative else value
    steps = (["-"] if negative else []) + texts
    steps[0] = THINK_OPEN + steps[0]
    steps[-1] = f"{steps[-1]}{THINK_CLOSE}{answer}"
    return steps, answer


def _digits(x: int, columns: int) -> list[int]:
    return [x // 10**i % 10 for i in range(columns)]  # units first


def stepwise_rows(task: ArithmeticTask, n: int, *, seed: int, split: Split = "train",
                  wrong_fraction: float = 0.5) -> list[dict[str, Any]]:  # fmt: skip
    """`n` rows {prompt, completions, labels, answer} from the task's `split`, a `wrong_fraction` share of them with
    a slip in a column drawn uniformly (module docstring)."""
    if "*" in task.operators:
        raise ValueError("stepwise rows: the arithmetic task's worked steps cover + and - only, not *")
    rng = random.Random(f"{seed}-{split}-steps")
    rows = []
    for problem in task.sample(n, seed=seed, split=split):
        a, op, b = _parse(problem["prompt"])
        slip = None
        if rng.random() < wrong_fraction:
            column = rng.randrange(task.digits)
            slip = (column, _slip_direction(a, op, b, column, task.digits, rng))
        steps, _ = worked_steps(a, op, b, columns=task.digits, slip=slip)
        first_wrong = len(steps) if slip is None else len(steps) - task.digits + slip[0]
        labels = [i < first_wrong for i in range(len(steps))]
        rows.append({"prompt": problem["prompt"], "completions": steps, "labels": labels,
                     "answer": str(OPERATORS[op](a, b))})  # fmt: skip
    return rows


def _slip_direction(a: int, op: str, b: int, column: int, columns: int, rng: random.Random) -> int:
    """+1 or -1, so that the slipped result stays a written number (never below 0; a difference stays a digit)."""
    steps, _ = worked_steps(a, op, b, columns=columns)
    written = int(steps[len(steps) - columns + column].split(THINK_CLOSE)[0].rpartition("=")[2])
    if written == 0:
        return 1
    if op == "-" and written == 9:
        return -1
    return rng.choice((-1, 1))


def _parse(prompt: str) -> tuple[int, str, int]:
    body = prompt.removesuffix("=")
    for i in range(1, len(body)):
        if body[i] in OPERATORS:
            return int(body[:i]), body[i], int(body[i + 1 :])
    raise ValueError(f"not an arithmetic prompt: {prompt!r}")
