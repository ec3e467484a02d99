"""Preference data from a verifiable task: the correct answer against a wrong one.

The wrong answer is a near duplicate by default, one token or one swap away from the correct one (arithmetic:
one digit off by one, a carry or borrow slip: `37+58=` gives chosen `95`, rejected `85` or `96`), or clearly
different (`rejected="different"`: `37+58=` gives rejected `12`; `tasks.problems`). The same pairs become
unpaired rows (KTO, BCO: chosen labelled desirable, rejected undesirable) or listwise rows (the answer and two
wrong ones, scored 1, 0, 0).
"""

from __future__ import annotations

import random
from typing import Any, Literal

from posttrain.tasks.problems import Rejected, Split, digit_slip

FeedbackKind = Literal["preference", "unpaired", "listwise", "stepwise"]
__all__ = ["FeedbackKind", "digit_slip", "feedback_rows", "preference_pairs"]


def preference_pairs(
    task: Any, n: int, *, seed: int, split: Split = "train", rejected: Rejected = "near_duplicate"
) -> list[dict[str, str]]:
    """`n` rows {prompt, chosen, rejected, answer} from the task's `split`; `rejected` says which kind of wrong
    answer is rejected."""
    rng = random.Random(f"{seed}-{split}-pairs")
    return [
        {"prompt": r["prompt"], "chosen": r["answer"], "rejected": task.wrong_answer(r["answer"], rng, rejected),
         "answer": r["answer"]}
        for r in task.sample(n, seed=seed, split=split)
    ]  # fmt: skip


def feedback_rows(
    task: Any, n: int, *, seed: int, split: Split, kind: FeedbackKind, rejected: Rejected = "near_duplicate"
) -> list[dict[str, Any]]:
    """Rows of a data kind built from `n` problems (unpaired: 2n rows, both halves of each pair)."""
    pairs = preference_pairs(task, n, seed=seed, split=split, rejected=rejected)
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
        other = task.wrong_answer(p["answer"], rng, rejected)
        for _ in range(20):  # some answers have a single near miss (a count of 0: only 1)
            if other != p["rejected"]:
                break
            other = task.wrong_answer(p["answer"], rng, rejected)
        while other == p["rejected"]:
            other = task.different_answer(p["answer"], rng)
        rows.append(
            {
                "prompt": p["prompt"],
                "completions": [p["chosen"], p["rejected"], other],
                "scores": [1.0, 0.0, 0.0],
                "answer": p["answer"],
            }
        )
    return rows
