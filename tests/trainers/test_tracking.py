"""Tracking through the one lifecycle (issue #25.1): every trainer writes RUN/config.yaml and logs to the trackers
of `log.to`; the online trainers log their sampled completions, prompts and each reward's score (and what reward
functions logged with `log_extra`) to samples.jsonl and the trackers' tables on `log.samples_every`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from posttrain.api import pref, rl, sft
from posttrain.cli import main
from posttrain.runtime import trackers
from posttrain.runtime.logging import read_metrics, read_samples

TASK = {"name": "arithmetic", "digits": 1, "operators": "+", "train_size": 64, "eval_size": 4}


def even_length(completions, log_extra, **kwargs):
    """1 when a completion has an even number of characters; logs each completion's length beside it."""
    log_extra("chars", [len(c) for c in completions])
    return [1.0 if len(c) % 2 == 0 else 0.0 for c in completions]


def long_or_none(completions, **kwargs):
    return [1.0 if len(c) > 4 else None for c in completions]  # None: not applicable


def rl_config(out: Path, **log) -> dict:
    return {
        "model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic"},
        "data": {"task": TASK, "max_length": 16},
        "train": {"max_steps": 3, "lr": 1e-4},
        "eval": {"max_new_tokens": 2, "limit": 2},
        "rl": {"prompts_per_step": 2, "group_size": 2, "sampling": {"max_new_tokens": 3}},
        "rewards": [{"fn": f"{__file__}:even_length"}, {"fn": f"{__file__}:long_or_none", "weight": 0.5}],
        "log": {"samples_every": 2, "samples_per_step": 3, **log},
        "output_dir": str(out),
    }


def test_rl_logs_sampled_completions_with_each_rewards_score_and_logged_columns(tmp_path: Path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    rl(rl_config(tmp_path / "run", to=["tensorboard", "mlflow"]), progress=False)
    rows = read_samples(tmp_path / "run")
    # step 1 and every 2nd step (2 of 3 steps), at most 3 of the step's 2 x 2 completions each
    assert [r["step"] for r in rows] == [1, 1, 1, 2, 2, 2]
    for row in rows:
        text = row["completion"]
        even = 1.0 if len(text) % 2 == 0 else 0.0
        long = 1.0 if len(text) > 4 else None
        assert row["reward/even_length"] == even and row["reward/long_or_none"] == long
        assert row["reward"] == pytest.approx(even + 0.5 * (long or 0.0))  # a None adds 0 to the total
        assert row["chars"] == len(text) and row["prompt"].endswith("=") and 1 <= row["tokens"] <= 3
    assert rows[0]["prompt"] == rows[1]["prompt"]  # a prompt's group together
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["log"]["to"] == ["tensorboard", "mlflow"] and config["rl"]["group_size"] == 2
    assert (tmp_path / "run" / "tensorboard").is_dir()
    # the lifecycle's log reached MLflow: the same numbers as metrics.jsonl, and the samples table
    run_id = json.loads((tmp_path / "run" / "trackers.json").read_text())["mlflow"]["run_id"]
    client = mlflow.tracking.MlflowClient()
    jsonl = [(r["step"], r["rewards/total/mean"]) for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    tracked = [(m.step, m.value) for m in client.get_metric_history(run_id, "train/rewards/total/mean")]
    assert tracked == jsonl and len(jsonl) == 3
    assert client.get_run(run_id).data.params["rl.group_size"] == "2"


def test_samples_every_zero_logs_no_samples(tmp_path: Path) -> None:
    rl(rl_config(tmp_path / "run", samples_every=0, to=[]), progress=False)
    assert read_samples(tmp_path / "run") == [] and not (tmp_path / "run" / "tensorboard").exists()


def digit_share(completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def test_online_preference_logs_each_rounds_samples_when_its_steps_hold_a_logged_step(tmp_path: Path) -> None:
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(5) for b in range(5)]
    config = {
        "model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic"},
        "data": {"train": "in-memory", "max_length": 16},
        "pref": {"loss": "dpo"},
        "online": {"rewards": [{"fn": f"{__file__}:digit_share"}], "prompts_per_round": 2, "samples_per_prompt": 2,
                   "steps_per_round": 2, "sampling": {"max_new_tokens": 3}},
        "train": {"max_steps": 6, "batch_size": 2, "warmup_steps": 0},
        "log": {"samples_every": 4, "to": []},
        "output_dir": str(tmp_path / "run"),
    }  # fmt: skip
    pref(config, train=rows, progress=False)
    logged = read_samples(tmp_path / "run")
    # rounds end at steps 2 (holds step 1), 4 (a multiple of 4) and 6 (holds none): 2 prompts x 2 samples each
    assert [r["step"] for r in logged] == [2, 2, 2, 2, 4, 4, 4, 4]
    for row in logged:
        share = sum(ch.isdigit() for ch in row["completion"]) / max(1, len(row["completion"]))
        assert row["reward/digit_share"] == pytest.approx(share, abs=1e-6) and row["reward"] == pytest.approx(share)


def test_sft_writes_its_config_and_the_default_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    config = {"model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic"}, "data": {"task": TASK, "max_length": 16},
              "train": {"max_steps": 2, "batch_size": 4}, "eval": {"limit": 2, "max_new_tokens": 2},
              "output_dir": str(tmp_path / "run")}  # fmt: skip
    sft(config, progress=False)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["max_steps"] == 2
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_a_tracker_selected_but_not_installed_is_one_line_before_training(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(trackers, "installed", lambda name: name != "trackio")
    code = main(["sft", "model.preset=qwen2-tiny", "model.tokenizer=arithmetic", "data.task.name=arithmetic",
                 "train.max_steps=1", "log.to=[trackio]", f"output_dir={tmp_path / 'run'}"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "log.to: trackio is selected but not installed; pip install 'posttrain[trackio]'" in err
    assert not list((tmp_path / "run").glob("checkpoints/*"))
