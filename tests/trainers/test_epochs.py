"""`train.epochs` (issue #25.4, TRL's num_train_epochs): an alternative to train.max_steps, resolved from the rows
loading kept, in every trainer; mutually exclusive with an explicit max_steps, an override of one replacing the
recipe's other; a resume keeps counting from the checkpoint's plan."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from posttrain.api import pref, rl, sft
from posttrain.config import ConfigError, PrefConfig, SFTConfig, load_config
from posttrain.runtime.logging import read_metrics

TINY = {"preset": "qwen2-tiny", "tokenizer": "arithmetic"}
ROWS = [{"prompt": f"{a}+{b}=", "completion": str(a + b), "answer": str(a + b)} for a in range(10) for b in range(10)]


def test_epochs_and_an_explicit_max_steps_are_one_error_and_an_override_replaces_the_other(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"set one of train.max_steps \(7\) and train.epochs \(2.0\), not both"):
        load_config(SFTConfig, {"model": TINY, "train": {"max_steps": 7, "epochs": 2}})
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {preset: qwen2-tiny, tokenizer: arithmetic}\ntrain: {max_steps: 7}\n")
    cfg = load_config(SFTConfig, recipe, ["train.epochs=3"])
    assert cfg.train.epochs == 3 and "max_steps" not in cfg.train.model_fields_set
    assert "train.epochs (the override) replaces the recipe's train.max_steps=7" in cfg.load_notes
    recipe.write_text("model: {preset: qwen2-tiny, tokenizer: arithmetic}\ntrain: {epochs: 2}\n")
    cfg = load_config(SFTConfig, recipe, ["train.max_steps=5"])
    assert (cfg.train.max_steps, cfg.train.epochs) == (5, None)


def sft_config(out: Path, **train) -> dict:
    return {"model": TINY, "data": {"train": "in-memory", "max_length": 16}, "eval": {"limit": 2},
            "train": {"batch_size": 32, "warmup_steps": 0, **train}, "output_dir": str(out)}  # fmt: skip


def test_sft_epochs_make_ceil_epochs_times_examples_over_batch_size_steps(tmp_path: Path, capsys) -> None:
    # 100 rows, 32 a step: 2 epochs = ceil(200 / 32) = 7 steps; 0.5 epochs = ceil(50 / 32) = 2
    result = sft(sft_config(tmp_path / "two", epochs=2), train=ROWS, progress=False)
    assert [h["step"] for h in result.history] == [1, 2, 3, 4, 5, 6, 7]
    assert "train.epochs=2: 100 examples, 32 per step -> train.max_steps=7" in " ".join(capsys.readouterr().err.split())
    assert len(sft(sft_config(tmp_path / "half", epochs=0.5), train=ROWS, progress=False).history) == 2
    # the schedule spans the 7 resolved steps: step 7 updates at cosine's t = 6 of T = 7, from 1e-3 towards 1e-4:
    # 1e-3 * (0.1 + 0.9 * 0.5 * (1 + cos(6 pi / 7))) = 1.4456e-4 (over the default 200 steps it would be ~1e-3)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "two") if r["kind"] == "train"]
    assert lrs[-1] == pytest.approx(1e-3 * (0.1 + 0.45 * (1 + math.cos(6 * math.pi / 7))))


def test_a_resume_counts_from_the_checkpoints_plan_and_applies_more_epochs(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    sft(sft_config(out, epochs=1), train=ROWS, progress=False)  # ceil(100 / 32) = 4 steps
    capsys.readouterr()
    again = sft(sft_config(out, epochs=1), train=ROWS, resume=True, progress=False)  # nothing left: final/ again
    assert len(again.history) == 4 and "is the run's last step (train.max_steps=4)" in capsys.readouterr().out
    more = sft(sft_config(out, epochs=2), train=ROWS, resume=True, progress=False)  # ceil(200 / 32) = 7
    assert [h["step"] for h in more.history] == [1, 2, 3, 4, 5, 6, 7]
    err = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert "resume: train.epochs 1.0 -> 2.0, applied from step 4" in err
    assert "train.max_steps=7 (the checkpoint's run planned 4" in err


def test_rl_epochs_count_prompts_over_prompts_per_step(tmp_path: Path) -> None:
    # 10 prompts, 4 a step: 1 epoch = ceil(10 / 4) = 3 steps
    config = {"model": TINY, "data": {"task": {"name": "arithmetic", "digits": 1, "train_size": 10, "eval_size": 2},
                                      "max_length": 16},
              "train": {"epochs": 1}, "eval": {"limit": 2, "max_new_tokens": 2},
              "rl": {"prompts_per_step": 4, "group_size": 2, "sampling": {"max_new_tokens": 2}},
              "log": {"to": []}, "output_dir": str(tmp_path / "rl")}  # fmt: skip
    assert len(rl(config, progress=False).history) == 3


def digit_share(completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def test_online_pref_epochs_make_whole_rounds(tmp_path: Path) -> None:
    # 25 prompts, 8 a round: 1 epoch = ceil(25 / 8) = 4 rounds of 2 steps = 8 steps (max_steps need not divide)
    config = {"model": TINY, "data": {"train": "in-memory", "max_length": 16}, "pref": {"loss": "dpo"},
              "online": {"rewards": [{"fn": f"{__file__}:digit_share"}], "prompts_per_round": 8,
                         "samples_per_prompt": 2, "steps_per_round": 2, "sampling": {"max_new_tokens": 2}},
              "train": {"epochs": 1, "batch_size": 4}, "log": {"to": []},
              "output_dir": str(tmp_path / "online")}  # fmt: skip
    assert load_config(PrefConfig, config).train.max_steps == 200  # unresolved until the data is read
    prompts = [{"prompt": r["prompt"], "answer": r["answer"]} for r in ROWS[:25]]
    assert [h["step"] for h in pref(config, train=prompts, progress=False).history] == list(range(1, 9))
