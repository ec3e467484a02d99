"""pass@k by hand; greedy accuracy and pass@k of `evaluate` with rewards whose verdicts are known."""

import json
from pathlib import Path

import pytest

import posttrain.api as api
from posttrain.data.encoding import PromptTokens
from posttrain.data.errors import DataError
from posttrain.policies import build_model
from posttrain.tasks import build_builtin_tokenizer
from posttrain.trainers.evaluation import evaluate, pass_at_k


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 0.4),  # 1 - C(3,1)/C(5,1) = 1 - 3/5
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (5, 0, 1, 0.0),  # no correct sample
        (5, 0, 5, 0.0),
        (5, 4, 2, 1.0),  # n - c = 1 < k = 2: every pair holds a correct one
        (5, 5, 1, 1.0),
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (10, 3, 3, 1 - 35 / 120),  # 1 - C(7,3)/C(10,3) = 1 - 35/120 = 0.708333
    ],
)
def test_pass_at_k_by_hand(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.fixture(scope="module")
def tokenizer():
    return build_builtin_tokenizer("arithmetic")


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_model("qwen2-tiny", tokenizer, seed=0)


@pytest.fixture
def prompts(tokenizer) -> list[PromptTokens]:
    rows = [("1+1=", "2"), ("12+30=", "42"), ("9-3=", "6")]
    return [
        PromptTokens(
            prompt_ids=tokenizer.encode(p),
            where=f"row {i + 1}",
            extra={"answer": a, "completion": "REFERENCE"},
        )
        for i, (p, a) in enumerate(rows)
    ]


def always(score: float):
    calls: list[dict] = []

    def reward(prompts, completions, **columns):
        calls.append({"prompts": prompts, "completions": completions, **columns})
        return [score] * len(completions)

    reward.calls = calls
    return reward


def test_reward_that_accepts_everything_gives_accuracy_one(model, tokenizer, prompts) -> None:
    reward = always(1.0)
    result = evaluate(model, tokenizer, prompts, reward, max_new_tokens=3)
    assert result.num_prompts == 3 and result.greedy_accuracy == 1.0
    assert result.metrics() == {"accuracy": 1.0, "examples": 3.0}
    assert all(e["correct"] for e in result.examples)
    # the reward sees the prompt text and the rows' other columns, one entry per completion
    (call,) = reward.calls
    assert call["prompts"] == ["1+1=", "12+30=", "9-3="]
    assert call["answer"] == ["2", "42", "6"]
    assert len(call["completions"]) == 3


def test_reward_that_accepts_nothing_gives_accuracy_zero(model, tokenizer, prompts) -> None:
    result = evaluate(model, tokenizer, prompts, always(0.0), max_new_tokens=3, samples=3, k=2)
    assert result.greedy_accuracy == 0.0
    assert result.pass_at_k == {1: 0.0, 2: 0.0}
    assert not any(e["correct"] for e in result.examples)


def test_scores_below_one_are_not_correct_and_none_does_not_count(model, tokenizer, prompts) -> None:
    # 0.99 wrong, None not applicable (left out), 1.0 right -> 1 of 2
    result = evaluate(model, tokenizer, prompts, lambda completions, **_: [0.99, None, 1.0], max_new_tokens=2)
    assert [e["correct"] for e in result.examples] == [False, None, True]
    assert result.greedy_accuracy == pytest.approx(1 / 2)


def test_pass_at_k_from_a_reward_with_known_verdicts(model, tokenizer, prompts) -> None:
    # completions arrive prompt-major; the reward accepts every 4th one.
    # greedy (n = 1, 3 completions): index 0 accepted -> accuracy 1/3
    # sampled (n = 4, 12 completions): indexes 0, 4, 8 -> one correct of 4 per prompt
    #   pass@1 = 1/4; pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 1/2; pass@3 = 1 - C(3,3)/C(4,3) = 3/4
    def every_fourth(completions, **_):
        return [1.0 if i % 4 == 0 else 0.0 for i in range(len(completions))]

    result = evaluate(model, tokenizer, prompts, every_fourth, max_new_tokens=2, samples=4, k=3)
    assert result.greedy_accuracy == pytest.approx(1 / 3)
    assert result.pass_at_k == pytest.approx({1: 0.25, 2: 0.5, 3: 0.75})
    assert result.metrics() == pytest.approx({"accuracy": 1 / 3, "pass@1": 0.25, "pass@2": 0.5, "pass@3": 0.75,
                                             "examples": 3.0})


def test_examples_hold_the_generated_completion(model, tokenizer, prompts) -> None:
    result = evaluate(model, tokenizer, prompts, always(1.0), max_new_tokens=3)
    greedy = api.generate(model, ["1+1="], tokenizer=tokenizer, temperature=0.0, max_new_tokens=3)[0][0]
    first = result.examples[0]
    assert first["completion"] == greedy  # what the model wrote, not the row's "completion" column
    assert first["prompt"] == "1+1=" and first["answer"] == "2" and first["where"] == "row 1"


def test_evaluate_batches_do_not_change_the_result(model, tokenizer, prompts) -> None:
    one = evaluate(model, tokenizer, prompts, always(1.0), max_new_tokens=3, batch_size=1)
    all_ = evaluate(model, tokenizer, prompts, always(1.0), max_new_tokens=3, batch_size=8)
    assert [e["completion"] for e in one.examples] == [e["completion"] for e in all_.examples]


def test_api_evaluate_writes_eval_json(model, tokenizer, tmp_path: Path) -> None:
    config = {
        "model": {"path": "unused"},
        "data": {"eval": "in-memory"},
        "eval": {"max_new_tokens": 2},
        "output_dir": str(tmp_path),
    }
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]
    result = api.evaluate(config, model=model, tokenizer=tokenizer, rows=rows, reward=always(1.0))
    assert result.greedy_accuracy == 1.0
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["metrics"] == {"accuracy": 1.0, "examples": 2.0} and written["num_prompts"] == 2
    with pytest.raises(DataError, match="answer"):
        api.evaluate(config, model=model, tokenizer=tokenizer, rows=[{"prompt": "1+1="}], reward=always(1.0))


def test_rows_the_reward_does_not_apply_to_are_left_out(model, tokenizer, prompts) -> None:
    # a verifier returns None for a row without a gold answer: it was counted wrong and kept in the denominators
    # (audit). Rows 1 and 3 correct, row 2 not applicable -> accuracy 2/2; every sample of them correct -> pass@k 1
    def verifier(prompts, completions, answer, **columns):
        return [None if a == "42" else 1.0 for a in answer]

    result = evaluate(model, tokenizer, prompts, verifier, max_new_tokens=2, samples=3, k=2)
    assert [e["correct"] for e in result.examples] == [True, None, True]
    assert result.greedy_accuracy == 1.0 and result.pass_at_k == {1: 1.0, 2: 1.0}

    def half(prompts, completions, answer, **columns):  # row 1 right, row 2 wrong, row 3 not applicable
        return [{"2": 1.0, "42": 0.0}.get(a) for a in answer]

    assert evaluate(model, tokenizer, prompts, half, max_new_tokens=2).greedy_accuracy == 0.5


def test_pass_at_k_needs_k_within_the_samples() -> None:
    with pytest.raises(ValueError, match=r"k=8 needs 1 <= k <= the 4 samples"):
        pass_at_k(4, 0, 8)
