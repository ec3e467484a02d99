"""Pairwise judges: the preference feedback of general-preference methods (DNO, Nash-MD, SPPO with a judge).

A judge is called once per batch of comparisons, like a reward function but on two completions:

    judge(prompts=[...], completions_a=[...], completions_b=[...], **columns) -> list[float]

and returns, for each row, the probability that completion a is preferred to completion b (1: a wins,
0: b wins, 0.5: a tie). Columns are the prompt rows' other fields (`answer`, ...), one value per row.
A recipe names a judge as it names a reward (`online.judge: {fn: module:function, args: {...}}`, or
`path/to/file.py:function`); functions should accept `**kwargs`.
"""

from __future__ import annotations

from typing import Any

from posttrain.rewards.base import completion_text
from posttrain.rewards.verifiers import extract_answer_span, extract_final_number


def closer_answer(
    *, completions_a: list[Any], completions_b: list[Any], answer: list[Any], **kwargs: Any
) -> list[float]:
    """A judge for numeric answers: the completion whose final number is closer to the answer wins.

    Equal distances (both right, or equally wrong) tie at 0.5; a completion with no number loses to one
    with a number. Unlike a 0/1 verifier it also prefers a near miss to a far one, so it ranks two wrong
    answers: a preference no single right/wrong reward expresses.
    """
    return [_closer(a, b, gold) for a, b, gold in zip(completions_a, completions_b, answer, strict=True)]


def _closer(a: Any, b: Any, gold: Any) -> float:
    target = extract_final_number(str(gold))
    distance_a, distance_b = (_distance(c, target) for c in (a, b))
    if distance_a == distance_b:
        return 0.5
    return 1.0 if distance_a < distance_b else 0.0


def _distance(completion: Any, target: float | None) -> float:
    value = extract_final_number(extract_answer_span(completion_text(completion)))
    if value is None or target is None:
        return float("inf")
    return abs(value - target)
