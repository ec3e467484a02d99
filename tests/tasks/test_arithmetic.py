"""The arithmetic task: correct rows, disjoint splits, seeded reproducibility, answer extraction."""

import re

import pytest

from posttrain.tasks import ArithmeticTask, extract_answer, verify

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
