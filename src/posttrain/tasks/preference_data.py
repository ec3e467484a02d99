"""Preference data from a verifiable task: the correct answer against a plausible wrong one.

A wrong answer is the correct one with one digit off by one (a carry or borrow slip): `37+58=` gives
chosen `95`, rejected `85` or `96`. The same pairs become unpaired rows (KTO, BCO: chosen labelled
desirable, rejected undesirable) or listwise rows (the answer and two slips, scored 1, 0, 0).
"""

from __future__ import annotations

import random
from typing import Any, Literal

from posttrain.tasks.arithmetic import ArithmeticTask, Split

FeedbackKind = Literal["preference", "unpaired", "listwise", "stepwise"]


def digit_slip(answer: str, rng: random.Random) -> str:
    """`answer` with one digit moved by +-1 (a carry error); never equal to `answer`."""
    value = int(answer)
    place = 10 ** rng.randrange(len(answer.lstrip("-")))
    wrong = value + rng.choice((-1, 1)) * place
    return str(wrong)


def preference_pairs(task: ArithmeticTask, n: int, *, seed: int, split: Split = "train") -> list[dict[str, str]]:
    """`n` rows {prompt, chosen, rejected, answer} from the task's `split`."""
    rng = random.Random(f"{seed}-{split}-pairs")
    return [
        {"prompt": r["prompt"], "chosen": r["answer"], "rejected": digit_slip(r["answer"], rng), "answer": r["answer"]}
        for r in task.sample(n, seed=seed, split=split)
    ]


def feedback_rows(task: ArithmeticTask, n: int, *, seed: int, split: Split, kind: FeedbackKind) -> list[dict[str, Any]]:
    """Rows of a data kind built from `n` problems (unpaired: 2n rows, both halves of each pair)."""
    pairs = preference_pairs(task, n, seed=seed, split=split)
    if kind == "preference":
        return pairs
    if kind == "unpaired":
        return [
            {"prompt": p["prompt"], "completion": p[side], "label": side == "chosen", "answer": p["answer"]}
            for p in pairs
            for side in ("chosen", "rejected")
        ]
    rng = random.Random(f"{seed}-{split}-lists")
    rows = []
    for p in pairs:
        other = digit_slip(p["answer"], rng)
        while other == p["rejected"]:
            other = digit_slip(p["answer"], rng)
        rows.append(
            {
                "prompt": p["prompt"],
                "completions": [p["chosen"], p["rejected"], other],
                "scores": [1.0, 0.0, 0.0],
                "answer": p["answer"],
            }
        )
    return rows
