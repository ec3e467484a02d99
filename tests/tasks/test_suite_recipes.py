"""The suite's tasks in recipes (issue #29.1): `data.task: {name: ...}` for sft, rl and pref, the task's verifier
as the default reward and judge, both kinds of preference pair from `data.task.rejected`, noisy demonstrations from
`data.task.wrong_fraction`, and `posttrain task NAME`."""

import json
from pathlib import Path

import pytest

from posttrain.api import pref, rl, sft
from posttrain.cli import main
from posttrain.config import PrefConfig, RLConfig, SFTConfig, validate
from posttrain.config.loading import ConfigError
from posttrain.tasks import build_builtin_tokenizer
from posttrain.trainers.splits import load_feedback

MODEL = {"preset": "qwen2-tiny", "tokenizer": "characters"}


@pytest.mark.parametrize(("name", "verifier"), [("reverse", "exact_match"), ("sort", "exact_match"),
                                                ("count", "numeric_match"), ("sequence", "numeric_match")])  # fmt: skip
def test_the_tasks_verifier_is_the_default_reward_and_judge(name: str, verifier: str) -> None:
    raw = {"model": MODEL, "data": {"task": {"name": name}}}
    assert validate(SFTConfig, raw).eval.reward == verifier
    cfg = validate(RLConfig, raw)
    assert [r.fn for r in cfg.rewards] == [verifier] and cfg.eval.reward == verifier
    assert validate(PrefConfig, raw).eval.reward == verifier


def test_a_recipes_own_reward_and_judge_are_kept() -> None:
    raw = {"model": MODEL, "data": {"task": {"name": "sort"}}, "eval": {"reward": "numeric_match"},
           "rewards": [{"fn": "numeric_match"}]}  # fmt: skip
    cfg = validate(RLConfig, raw)
    assert cfg.eval.reward == "numeric_match" and [r.fn for r in cfg.rewards] == ["numeric_match"]
    # arithmetic keeps numeric_match, the old default
    arithmetic = validate(SFTConfig, {"model": MODEL, "data": {"task": {"name": "arithmetic"}}})
    assert arithmetic.eval.reward == "numeric_match"


def test_arithmetic_settings_on_another_task_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"data\.task.*digits: not a setting of the sort task"):
        validate(SFTConfig, {"model": MODEL, "data": {"task": {"name": "sort", "digits": 3}}})
    with pytest.raises(ConfigError, match=r"data\.task\.name"):
        validate(SFTConfig, {"model": MODEL, "data": {"task": {"name": "spelling"}}})


def test_pairs_of_both_kinds_from_a_recipe() -> None:
    tokenizer = build_builtin_tokenizer("characters")
    rejected_of = {}
    for kind in ("near_duplicate", "different"):
        cfg = validate(PrefConfig, {"model": MODEL, "data": {"task": {"name": "reverse", "train_size": 40,
                                                                      "rejected": kind}}})  # fmt: skip
        split = load_feedback(cfg.data, "preference", "train", tokenizer, seed=0, recipe_dir=None)
        rejected_of[kind] = [(tokenizer.decode(t.chosen_ids, skip_special_tokens=True),
                              tokenizer.decode(t.rejected_ids, skip_special_tokens=True)) for t in split.tokens]
    assert len(rejected_of["near_duplicate"]) == len(rejected_of["different"]) == 40
    for chosen, rejected in rejected_of["near_duplicate"]:  # one swap of two neighbours (or one letter of `aaa`)
        assert sum(a != b for a, b in zip(chosen, rejected, strict=True)) in (1, 2)
    for chosen, rejected in rejected_of["different"]:  # at least half the letters differ, and at least 2
        assert sum(a != b for a, b in zip(chosen, rejected, strict=True)) >= max(2, (len(chosen) + 1) // 2)


def test_sft_rl_and_pref_run_on_a_suite_task(tmp_path: Path) -> None:
    task = {"name": "sort", "train_size": 200, "eval_size": 8, "wrong_fraction": 0.2}
    common = {"data": {"task": task, "max_length": 24}, "eval": {"max_new_tokens": 7}}
    tuned = sft({"model": MODEL, **common, "train": {"max_steps": 20, "batch_size": 16, "lr": 3e-3},
                 "output_dir": str(tmp_path / "sft")}, progress=False)  # fmt: skip
    losses = [h["loss"] for h in tuned.history if "loss" in h]
    assert losses[-1] < losses[0]
    assert tuned.eval.num_prompts == 8  # the held-out split, judged by exact_match
    assert all(e["correct"] == (e["completion"].strip() == e["answer"]) for e in tuned.eval.examples)
    start = {"path": str(tuned.final_dir)}
    online = rl({"model": start, **common, "rl": {"prompts_per_step": 2, "group_size": 2,
                                                  "sampling": {"max_new_tokens": 7}},
                 "train": {"max_steps": 2}, "output_dir": str(tmp_path / "rl")}, progress=False)  # fmt: skip
    assert len(online.history) == 2
    assert all("rewards/exact_match/mean" in h for h in online.history)  # the task's verifier is the reward
    offline = pref({"model": start, "data": {"task": {**task, "kind": "preference", "rejected": "different"},
                                             "max_length": 24},
                    "train": {"max_steps": 2, "batch_size": 8}, "output_dir": str(tmp_path / "pref")},
                   progress=False)  # fmt: skip
    assert (offline.final_dir / "config.json").is_file()
    assert "eval_pref_accuracy" in offline.final_eval


def test_posttrain_task_writes_a_suite_task_with_noisy_demonstrations(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sort"
    assert main(["task", "sort", str(out), "--train-size", "400", "--eval-size", "50", "--wrong-fraction", "0.5"]) == 0
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    held_out = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert len(train) == 400 and len(held_out) == 50
    assert all(r["answer"] == "".join(sorted(r["prompt"][len("sort "):-1])) for r in train + held_out)
    wrong = sum(r["completion"] != r["answer"] for r in train)
    assert 150 <= wrong <= 250  # 400 draws at 0.5: mean 200, standard deviation 10
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    assert main(["task", "sort", str(tmp_path / "x"), "--digits", "3"]) == 2
    assert "digits are settings of the arithmetic task" in capsys.readouterr().err
