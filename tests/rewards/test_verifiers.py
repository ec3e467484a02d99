"""Built-in verifiers on hand-written completions."""

import pytest

from posttrain.rewards.verifiers import (
    MathVerifyReward,
    exact_match,
    extract_answer_span,
    extract_final_number,
    numeric_match,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the answer is 42.", 42.0),
        ("1,234.5 apples", 1234.5),
        ("half is 3/4 of it", 0.75),
        ("x = -5", -5.0),
        ("from 1-5", 5.0),  # the dash is a range, not a sign
        ("#### 72", 72.0),
        ("2e3", 2000.0),
        (".5", 0.5),
        ("no digits here", None),
    ],
)
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


def test_extract_answer_span_takes_last_answer_tag_or_whole_text():
    assert extract_answer_span("<answer>1</answer> then <answer> 2 </answer>") == " 2 "
    assert extract_answer_span("plain 7") == "plain 7"


def test_exact_match_strips_and_compares_str_of_answer():
    scores = exact_match(
        completions=["  Paris\n", "paris", "<think>hm</think><answer> 12 </answer>", "x"],
        answer=["Paris", "Paris", 12, None],
    )
    # case matters; the <answer> content is compared; None answer -> not applicable
    assert scores == [1.0, 0.0, 1.0, None]


def test_exact_match_reads_conversational_completions():
    completions = [[{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]]
    assert exact_match(completions=completions, answer=["4", "4"]) == [1.0, 0.0]


def test_numeric_match_compares_final_numbers_with_tolerance():
    scores = numeric_match(
        completions=[
            "2 + 2 = 4",  # final number 4
            "<answer>1,000</answer> and later 7",  # the <answer> content wins: 1000
            "I think 0.3333",  # |0.3333 - 1/3| = 3.3e-5 > 1e-6
            "no number",
            "72",
        ],
        answer=["4", "1000", "1/3", "5", "#### 72"],
    )
    assert scores == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_numeric_match_tolerances_and_unreadable_gold():
    # |0.3333 - 0.33333...| = 3.33e-5 <= abs_tol 1e-4
    assert numeric_match(completions=["0.3333"], answer=["1/3"], abs_tol=1e-4) == [1.0]
    # rel_tol 1%: |101 - 100| = 1 <= 0.01 * 101
    assert numeric_match(completions=["101"], answer=[100], rel_tol=0.01) == [1.0]
    assert numeric_match(completions=["3", "3"], answer=["n/a", None]) == [None, None]


def test_math_verify_equates_fraction_and_decimal():
    reward = MathVerifyReward()
    scores = reward(
        completions=[
            "0.5",
            "The answer is $\\boxed{\\frac{1}{2}}$",
            "<think>so 1/3</think><answer>\\frac{1}{3}</answer>",
            "0.6",
        ],
        answer=["\\frac{1}{2}", "0.5", "\\frac{1}{2}", "\\frac{1}{2}"],
    )
    assert scores == [1.0, 1.0, 0.0, 0.0]


def test_math_verify_gold_it_cannot_parse_is_not_applicable():
    assert MathVerifyReward()(completions=["1"], answer=["no maths here"]) == [None]


def test_math_verify_works_off_the_main_thread():
    # math-verify's own limits use signal.alarm, which fails off the main thread; they are off there.
    import threading

    out = []
    reward = MathVerifyReward()
    thread = threading.Thread(target=lambda: out.append(reward(completions=["0.5"], answer=["1/2"])))
    thread.start()
    thread.join()
    assert out == [[1.0]]


def test_missing_math_verify_names_the_install_command(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "math_verify", None)  # makes `import math_verify` raise ImportError
    with pytest.raises(ImportError, match=r"pip install posttrain\[math\]"):
        MathVerifyReward()


def test_numeric_match_compares_exactly_past_float_precision() -> None:
    # in floats 12345678901234567890 and ...891 (and 2^53 and 2^53 + 1) are one number (audit); exactly they are
    # not. Numbers too long for exact reading (5,000 nines, an exponent of 10^9) are floats and cost nothing
    from posttrain.rewards.verifiers import numeric_match

    completions = ["12345678901234567890", str(2**53 + 1), "9" * 5000, "1e999999999", "7", "0.1"]
    answers = ["12345678901234567891", str(2**53), "9" * 5000, "1e999999999", "7.0000001", "1/10"]
    assert numeric_match(completions=completions, answer=answers) == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]


def test_a_fraction_may_have_a_decimal_denominator() -> None:
    # "3/4.5" read as its ".5" tail, 0.5 (audit); 3 / 4.5 = 2/3; a full stop after a fraction ends the sentence
    from posttrain.rewards.verifiers import extract_final_number

    assert extract_final_number("3/4.5") == pytest.approx(2 / 3)
    assert extract_final_number("x = 3/4.") == 0.75
