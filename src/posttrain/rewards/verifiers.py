"""Verifiers: does the completion state the ground-truth `answer` column? Each scores 1.0 or 0.0.

All three read the content of the last `<answer>...</answer>` of a completion when it has one (the
R1 output format), and the whole completion otherwise. A row whose `answer` is None or cannot be
read as the verifier needs gets `None` (not applicable) rather than a wrong-answer 0, as TRL's
`accuracy_reward` does for unparseable gold answers.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from fractions import Fraction
from typing import Any

from posttrain.rewards.base import completion_text

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# An integer or decimal, thousands separated by commas or not, with an optional exponent and an optional
# "/denominator" so that "3/4" reads as 0.75 rather than 4. A sign counts only where it cannot be a
# binary operator ("1-5" is 1 and 5, "= -5" is -5).
_NUMBER = re.compile(
    r"(?:(?<![\w).])[-+])?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?"
)

_MANTISSA = re.compile(r"[-+]?\.?\d")


def extract_answer_span(text: str) -> str:
    """The content of the last `<answer>...</answer>` in `text`, or `text` itself when there is none."""
    spans = _ANSWER_TAG.findall(text)
    return spans[-1] if spans else text


def extract_final_number(text: str) -> float | None:
    """The last number written in `text` ("1,234.5" -> 1234.5, "3/4" -> 0.75), or None if there is none."""
    exact = extract_final_fraction(text)
    if exact is None:
        return None
    try:
        return float(exact)
    except OverflowError:  # past float's range
        return math.inf if exact > 0 else -math.inf


def extract_final_fraction(text: str) -> Fraction | float | None:
    """`extract_final_number` as the exact rational number written, so that integers past 2^53 stay distinct (a
    float for a number past MAX_EXACT_DIGITS)."""
    last = None
    for match in _NUMBER.finditer(text):
        if _MANTISSA.match(match.group()):  # "e1" alone matches _NUMBER but is not a number
            last = match.group()
    return None if last is None else _parse_number(last)


MAX_EXACT_DIGITS = 400
"""Numbers written with more digits, or a larger exponent, are read as floats: "1e999999999" as an exact integer
would take a billion-digit product (a completion could hang its reward), and Python refuses to read integers of
over 4,300 digits."""


def _parse_number(token: str) -> Fraction | float:
    token = token.replace(",", "").replace(" ", "")
    exponent = re.search(r"[eE]([-+]?\d+)", token)
    too_long = sum(ch.isdigit() for ch in token) > MAX_EXACT_DIGITS
    if too_long or (exponent is not None and abs(int(exponent.group(1))) > MAX_EXACT_DIGITS):
        return float(token.split("/")[0])  # inf or 0.0, whatever a denominator

    if "/" in token:
        numerator, denominator = token.split("/")
        if Fraction(denominator) == 0:
            return Fraction(numerator)  # "1/0" is not a fraction; keep the number that was written first
        return Fraction(numerator) / Fraction(denominator)
    return Fraction(token)


def exact_match(*, completions: list[Any], answer: list[Any], **kwargs: Any) -> list[float | None]:
    """1.0 when the completion (or its `<answer>` content), stripped, equals `str(answer)`, stripped."""
    return [
        None if gold is None else float(extract_answer_span(completion_text(c)).strip() == str(gold).strip())
        for c, gold in zip(completions, answer, strict=True)
    ]


def numeric_match(
    *,
    completions: list[Any],
    answer: list[Any],
    abs_tol: float = 1e-6,
    rel_tol: float = 0.0,
    **kwargs: Any,
) -> list[float | None]:
    """1.0 when the final number of the completion (or of its `<answer>` content) equals the answer's.

    The gold answer goes through the same extraction, so "#### 72" (GSM8K style), "72" and 72 all
    read as 72. Equal means |pred - gold| <= max(rel_tol * max(|pred|, |gold|), abs_tol), as `math.isclose`, in
    exact rational arithmetic (in floats 12345678901234567890 and ...891 are one number). A completion without a
    number scores 0.0; an answer without one gets None (not applicable).
    """
    scores: list[float | None] = []
    tolerance_rel, tolerance_abs = Fraction(rel_tol), Fraction(abs_tol)
    for c, gold in zip(completions, answer, strict=True):
        gold_value = None if gold is None else extract_final_fraction(str(gold))
        if gold_value is None:
            scores.append(None)
            continue
        pred = extract_final_fraction(extract_answer_span(completion_text(c)))
        bound = None if pred is None else max(tolerance_rel * max(abs(pred), abs(gold_value)), tolerance_abs)
        scores.append(float(pred is not None and (pred == gold_value or abs(pred - gold_value) <= bound)))
    return scores


class MathVerifyReward:
    """1.0 when Hugging Face's math-verify finds the completion's answer equal to the gold answer.

    Parses the gold answer and the completion (LaTeX, `\\boxed{}`, plain expressions) into sympy and
    compares them, so `\\frac{1}{2}` matches `0.5`. Args are those of `math_verify.verify`:
    `float_rounding` (digits kept before comparing floats) and `strict`.

    Runs off the main thread under `RewardSet`'s time limit, where math-verify's own `signal.alarm`
    limits cannot work; they are switched off there and `RewardSet`'s `timeout_s` bounds the call.
    """

    __name__ = "math_verify"

    def __init__(self, *, float_rounding: int = 6, strict: bool = True):
        self._parse, self._verify = _import_math_verify()
        _silence_disabled_timeout_warnings()
        self.float_rounding = float_rounding
        self.strict = strict

    def __call__(self, *, completions: list[Any], answer: list[Any], **kwargs: Any) -> list[float | None]:
        limit_s = 5 if threading.current_thread() is threading.main_thread() else None
        scores: list[float | None] = []
        for c, gold in zip(completions, answer, strict=True):
            gold_parsed = [] if gold is None else self._parse(str(gold), parsing_timeout=limit_s)
            if not gold_parsed:
                scores.append(None)
                continue
            pred_parsed = self._parse(extract_answer_span(completion_text(c)), parsing_timeout=limit_s)
            same = self._verify(
                gold_parsed,
                pred_parsed,
                float_rounding=self.float_rounding,
                strict=self.strict,
                timeout_seconds=limit_s,
            )
            scores.append(float(same))
        return scores


def _import_math_verify() -> tuple[Any, Any]:
    # Optional dependency: only the math_verify reward needs it, so import it when that reward is built.
    try:
        from math_verify import parse, verify
    except ImportError as err:
        raise ImportError("reward 'math_verify' needs the math-verify library: pip install posttrain[math]") from err
    return parse, verify


def _drop_disabled_timeout_warning(record: logging.LogRecord) -> bool:
    return "Timeout is disabled" not in record.getMessage()


def _silence_disabled_timeout_warnings() -> None:
    # math-verify warns on every call made with its timeout off; off the main thread that is by design
    # here (RewardSet bounds the call), so drop that one message and keep the library's other logs.
    for name in ("math_verify.parser", "math_verify.grader"):
        library_logger = logging.getLogger(name)
        if _drop_disabled_timeout_warning not in library_logger.filters:
            library_logger.addFilter(_drop_disabled_timeout_warning)
