"""TRL's own reward-function examples (GRPOTrainer docs, "Using a custom reward function") run unchanged: text
prompts get string completions, conversational prompts get [{"role": "assistant", "content": ...}], with the
prompts as written, completion_ids, trainer_state, log_metric and the other columns."""

import re
from pathlib import Path

import pytest

import posttrain
from posttrain.policies import build_model
from posttrain.tasks import build_builtin_tokenizer


def text_rows() -> list[dict]:
    return [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(8)]


def chat_rows() -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"{a}+{a}="}], "answer": str(2 * a)} for a in range(8)]


def run_rl(tmp_path: Path, rows: list[dict], reward) -> list[dict]:
    tokenizer = build_builtin_tokenizer("arithmetic")
    config = {"train": {"max_steps": 2}, "output_dir": str(tmp_path),
              "rl": {"prompts_per_step": 2, "group_size": 2, "sampling": {"max_new_tokens": 3}}}  # fmt: skip
    return posttrain.rl(config, model=build_model("qwen2-tiny", tokenizer, seed=0), tokenizer=tokenizer,
                        train=rows, rewards=[reward], progress=False).history  # fmt: skip


def test_trls_text_example_gets_strings(tmp_path: Path) -> None:
    seen = []

    def reward_func(completions, **kwargs):  # TRL docs: standard format
        seen.append((kwargs["prompts"], completions, kwargs["trainer_state"].global_step, kwargs["answer"]))
        return [float(len(completion)) for completion in completions]

    run_rl(tmp_path, text_rows(), reward_func)
    assert [step for _, _, step, _ in seen] == [0, 1]
    for prompts, completions, _, answers in seen:
        assert all(isinstance(c, str) for c in completions) and len(completions) == 4
        assert prompts[0] == prompts[1] and re.fullmatch(r"\d\+\d=", prompts[0])
        assert answers[0] == str(2 * int(prompts[0][0]))


def test_trls_conversational_example_gets_assistant_messages(tmp_path: Path) -> None:
    seen = []

    def reward_func(completions, **kwargs):  # TRL docs: conversational format
        seen.append((kwargs["prompts"], completions))
        kwargs["log_metric"]("mean_length", sum(len(c[0]["content"]) for c in completions) / len(completions))
        return [float(len(completion[0]["content"])) for completion in completions]

    def format_reward_func(completions, **kwargs):  # TRL docs: the format reward, conversational
        pattern = r"^<think>.*?</think><answer>.*?</answer>$"
        completion_contents = [completion[0]["content"] for completion in completions]
        matches = [re.match(pattern, content) for content in completion_contents]
        return [1.0 if match else 0.0 for match in matches]

    history = run_rl(tmp_path, chat_rows(), reward_func)
    run_rl(tmp_path / "format", chat_rows(), format_reward_func)
    for prompts, completions in seen:
        assert all(c == [{"role": "assistant", "content": c[0]["content"]}] for c in completions)
        assert prompts[0] in [r["prompt"] for r in chat_rows()]  # the row's messages, not rendered template text
    assert "rewards/logged/mean_length" in history[0]


def test_evaluation_calls_the_reward_the_same_way(tmp_path: Path) -> None:
    seen = []

    def correct(prompts, completions, answer, **kwargs):
        seen.append(completions)
        return [1.0 if c[0]["content"].strip() == a else 0.0 for c, a in zip(completions, answer)]

    tokenizer = build_builtin_tokenizer("arithmetic")
    result = posttrain.evaluate({"output_dir": str(tmp_path), "eval": {"max_new_tokens": 3}},
                                model=build_model("qwen2-tiny", tokenizer, seed=0), tokenizer=tokenizer,
                                rows=chat_rows(), reward=correct)  # fmt: skip
    assert result.num_prompts == 8 and all(isinstance(c, list) for batch in seen for c in batch)


@pytest.mark.parametrize("rows", [text_rows, chat_rows])
def test_builtin_verifiers_read_both_forms(tmp_path: Path, rows) -> None:
    history = run_rl(tmp_path, rows(), _numeric)
    assert all(0.0 <= h["rewards/_numeric/mean"] <= 1.0 for h in history)  # applied (NaN would fail): 0 or 1 each


def _numeric(completions, answer, **kwargs):
    from posttrain.rewards.verifiers import numeric_match

    return numeric_match(completions=completions, answer=answer)
