"""Pairwise judges: the preference feedback of general-preference methods (DNO, Nash-MD, SPPO with a judge).

A judge is called once per batch of comparisons, like a reward function but on two completions:

    judge(prompts=[...], completions_a=[...], completions_b=[...], **columns) -> list[float]

and returns, for each row, the probability that completion a is preferred to completion b (1: a wins,
0: b wins, 0.5: a tie). Columns are the prompt rows' other fields (`answer`, ...), one value per row.
A recipe names a judge as it names a reward (`online.judge: {fn: module:function, args: {...}}`, or
`path/to/file.py:function`); functions should accept `**kwargs`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from posttrain.data.encoding import PromptTokens
from posttrain.rewards.base import RewardFailureError, completion_text
from posttrain.rewards.scoring import call_within, describe_failure
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


def judge_all_pairs(
    judge: Callable[..., Any],
    tokenizer: Any,
    prompts: list[PromptTokens],
    completions: list[list[list[int]]],
    timeout_s: float | None = None,
) -> Tensor:
    """prefs_P_K_K from one judge call over every unordered pair (i < j) of each prompt's completions:
    pref[i, j] = the judge's P(i preferred to j), pref[j, i] = 1 - pref[i, j], pref[i, i] = 1/2.
    A call that raises or runs past `timeout_s` stops the run (`RewardFailureError`)."""
    k = len(completions[0])
    upper = [(i, j) for i in range(k) for j in range(i + 1, k)]
    texts = [tokenizer.batch_decode(group, skip_special_tokens=True) for group in completions]
    prompt_texts = tokenizer.batch_decode([p.prompt_ids for p in prompts], skip_special_tokens=True)
    keys = sorted({key for p in prompts for key in p.extra})
    rows = [(p, i, j) for p in range(len(prompts)) for i, j in upper]
    kwargs = {
        "prompts": [prompt_texts[p] for p, _, _ in rows],
        "completions_a": [texts[p][i] for p, i, _ in rows],
        "completions_b": [texts[p][j] for p, _, j in rows],
        **{key: [prompts[p].extra.get(key) for p, _, _ in rows] for key in keys},
    }
    verdicts, error = call_within(judge, kwargs, timeout_s)
    if error is None:
        try:
            values = torch.tensor([float(v) for v in verdicts], dtype=torch.float32)
        except Exception as unreadable:  # a judge is user code: say which call failed, not where inside torch
            error = unreadable
    if error is not None:
        name = getattr(judge, "__name__", repr(judge))
        raise RewardFailureError(
            f"online.judge '{name}' failed on a round of {len(rows)} comparisons: {describe_failure(error)}"
        ) from error
    if len(values) != len(rows) or not bool(((values >= 0) & (values <= 1)).all()):
        raise ValueError(
            f"online.judge returned {len(values)} values for {len(rows)} comparisons; it must return one "
            "probability in [0, 1] per row (that completions_a is preferred to completions_b)"
        )
    prefs_P_K_K = torch.full((len(prompts), k, k), 0.5)
    if rows:
        index = torch.tensor(rows)
        prefs_P_K_K[index[:, 0], index[:, 1], index[:, 2]] = values
        prefs_P_K_K[index[:, 0], index[:, 2], index[:, 1]] = 1.0 - values
    return prefs_P_K_K
