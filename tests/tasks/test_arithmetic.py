"""The arithmetic task: correct rows, disjoint splits, seeded reproducibility, answer extraction."""

import re

import pytest

from posttrain.rewards.verifiers import numeric_match
from posttrain.tasks import ArithmeticTask, extract_answer, verify
from posttrain.tasks.arithmetic import worked_completion

_PROMPT = re.compile(r"^(\d+)([+\-*])(\d+)=$")


def solve(prompt: str) -> int:
    """The test's own solver: operands are non-negative integers, one operator, a trailing '='."""
    match = _PROMPT.match(prompt)
    assert match, prompt
    a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    return a * b


def test_row_by_hand() -> None:
    task = ArithmeticTask()
    assert task.row(37, "+", 58) == {"prompt": "37+58=", "completion": "95", "answer": "95"}
    assert task.row(3, "-", 10) == {"prompt": "3-10=", "completion": "-7", "answer": "-7"}
    assert task.row(12, "*", 11) == {"prompt": "12*11=", "completion": "132", "answer": "132"}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("split", ["train", "eval"])
def test_sampled_rows_are_correct(seed: int, split: str) -> None:
    task = ArithmeticTask(digits=3, operators="+-*")
    rows = task.sample(200, seed=seed, split=split)
    assert len(rows) == 200
    for row in rows:
        assert set(row) == {"prompt", "completion", "answer"}
        assert row["completion"] == row["answer"]
        assert int(row["answer"]) == solve(row["prompt"])
        a, b = re.split(r"[+\-*]", row["prompt"][:-1])
        assert 1 <= len(a) <= 3 and 1 <= len(b) <= 3
        assert a == str(int(a)) and b == str(int(b))  # no leading zeros


def test_operators_are_respected() -> None:
    rows = ArithmeticTask(digits=2, operators="*").sample(50, seed=0)
    assert all("*" in r["prompt"] and "+" not in r["prompt"] for r in rows)
    # 50 draws from "+-" give both operators (P(all the same) = 2 * 2^-50)
    ops = {re.search(r"[+\-]", r["prompt"]).group(0) for r in ArithmeticTask().sample(50, seed=0)}
    assert ops == {"+", "-"}


def test_train_and_eval_never_overlap() -> None:
    task = ArithmeticTask(digits=2)
    train = {r["prompt"] for r in task.sample(5000, seed=0, split="train")}
    evals = {r["prompt"] for r in task.sample(5000, seed=0, split="eval")}
    # digits=2, "+-": 100 * 2 * 100 = 20000 problems, about 10% held out, so both sets are large
    assert len(train) > 1000 and len(evals) > 500
    assert train.isdisjoint(evals)
    # the split is a function of the problem alone: another seed's eval rows are never in train
    assert train.isdisjoint({r["prompt"] for r in task.sample(2000, seed=5, split="eval")})


def test_seeded_generation_is_reproducible_and_seed_dependent() -> None:
    task = ArithmeticTask()
    assert task.sample(50, seed=3) == task.sample(50, seed=3)
    assert task.sample(50, seed=3) != task.sample(50, seed=4)
    assert task.sample(50, seed=3, split="eval") == ArithmeticTask().sample(50, seed=3, split="eval")
    # a shorter draw is a prefix of a longer one (rows come from one stream)
    assert task.sample(20, seed=3) == task.sample(50, seed=3)[:20]


def test_invalid_task_parameters() -> None:
    with pytest.raises(ValueError, match="digits"):
        ArithmeticTask(digits=0)
    with pytest.raises(ValueError, match="operators"):
        ArithmeticTask(operators="/")
    with pytest.raises(ValueError, match="operators"):
        ArithmeticTask(operators="")
    with pytest.raises(ValueError, match="think_fraction"):
        ArithmeticTask(think_fraction=1.5)
    with pytest.raises(ValueError, match="think_fraction"):
        ArithmeticTask(operators="+*", think_fraction=0.5)


@pytest.mark.parametrize(
    ("a", "op", "b", "columns", "expected"),
    [
        # 7+8 = 15, carry 1; 3+5+1 = 9
        (37, "+", 58, 2, "<think>7+8=15;3+5+1=9</think>95"),
        # one-digit operands still take two columns, the tens being 0
        (3, "+", 2, 2, "<think>3+2=5;0+0+0=0</think>5"),
        (99, "+", 99, 2, "<think>9+9=18;9+9+1=19</think>198"),
        # 3 < 8: borrow, 13-8 = 5; tens 7 - 1 (borrowed) - 5 = 1
        (73, "-", 58, 2, "<think>13-8=5;7-1-5=1</think>15"),
        (58, "-", 23, 2, "<think>8-3=5;5-0-2=3</think>35"),
        # 23 < 58: "-", then 58 - 23
        (23, "-", 58, 2, "<think>-;8-3=5;5-0-2=3</think>-35"),
        (5, "-", 5, 2, "<think>5-5=0;0-0-0=0</think>0"),
        # 3 < 8: 13-8 = 5; tens 0 - 1 < 5: 10-1-5 = 4; hundreds 1 - 1 - 0 = 0
        (103, "-", 58, 3, "<think>13-8=5;10-1-5=4;1-1-0=0</think>45"),
    ],
)
def test_worked_completion_by_hand(a: int, op: str, b: int, columns: int, expected: str) -> None:
    assert worked_completion(a, op, b, columns=columns) == expected


_STEP = re.compile(r"^(\d+)([+-])(\d)(?:([+-])(\d))?=(\d+)$")


def check_working(prompt: str, completion: str) -> None:
    """The test's own reading of a worked completion: every column step is true arithmetic, its digits
    are the operands' columns from the units, and the stated answer is the problem's."""
    a, op, b = re.match(r"^(\d+)([+-])(\d+)=$", prompt).groups()
    working, answer = re.match(r"^<think>(.*)</think>(-?\d+)$", completion).groups()
    assert int(answer) == solve(prompt)
    steps = working.split(";")
    if steps[0] == "-":  # a < b: the columns of b - a
        assert op == "-" and int(a) < int(b)
        steps, a, b = steps[1:], b, a
    for column, step in enumerate(steps):
        top, op1, y, op2, z, result = _STEP.match(step).groups()
        value = int(top) + (int(y) if op1 == "+" else -int(y))
        if op2:
            value += int(z) if op2 == "+" else -int(z)
        assert value == int(result), step
        a_digit, b_digit = int(a) // 10**column % 10, int(b) // 10**column % 10
        assert int(top) % 10 == a_digit and b_digit == (int(y) if op == "+" or column == 0 else int(z))


def test_sampled_worked_rows_are_true_column_arithmetic() -> None:
    task = ArithmeticTask(digits=2, think_fraction=0.3)
    rows = task.sample(2000, seed=0)
    worked = [r for r in rows if r["completion"] != r["answer"]]
    # 2000 draws at 0.3: mean 600, sd 20.5
    assert 500 < len(worked) < 700
    for row in worked:
        check_working(row["prompt"], row["completion"])
        assert extract_answer(row["completion"]) == row["answer"]
    # which rows think is drawn from its own stream: the problems are those drawn without working
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in ArithmeticTask(digits=2).sample(2000, seed=0)]


def test_verifiers_read_the_answer_after_the_working() -> None:
    completions = ["<think>-;8-3=5;5-0-2=3</think>-35", "<think>-;8-3=5;5-0-2=3</think>35"]
    # the last number: -35 (right), then 35 (the sign lost), although 3, 5 and -35 all appear in the working
    assert numeric_match(completions=completions, answer=["-35", "-35"]) == [1.0, 0.0]
    assert [verify(c, "-35") for c in completions] == [True, False]
    assert not verify("<think>-;8-3=5;5-0-2=3</think>", "3")  # working without an answer states none


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("95", "95"),
        (" 95<|im_end|>", "95"),
        ("-3", "-3"),
        ("abc", None),
        ("", None),
        ("095", "095"),
        ("the answer is 12, not 13", "12"),
        ("7-2", "7"),
        ("<think>7+8=15;3+5+1=9</think>95", "95"),
        ("<think>7+8=15</think>", None),
    ],
)
def test_extract_answer(completion: str, expected: str | None) -> None:
    assert extract_answer(completion) == expected


@pytest.mark.parametrize(
    ("completion", "answer", "correct"),
    [
        ("95", "95", True),
        (" 95<|im_end|>", "95", True),
        ("-3", "-3", True),
        ("3", "-3", False),
        ("abc", "95", False),
        ("095", "95", True),  # compared as integers
        ("96", "95", False),
        ("95 96", "95", True),  # the first integer counts
        ("96 95", "95", False),
    ],
)
def test_verify(completion: str, answer: str, correct: bool) -> None:
    assert verify(completion, answer) is correct
