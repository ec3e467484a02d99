"""`posttrain rm`: a scalar-head reward model learns its pairs, saves a directory that
AutoModelForSequenceClassification loads, and trains listwise from scored completions."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from posttrain.api import as_config
from posttrain.config import ConfigError, RMConfig
from posttrain.tasks import ArithmeticTask
from posttrain.tasks.preference_data import feedback_rows, preference_pairs
from posttrain.trainers.reward_model import train_rm

TASK = ArithmeticTask(digits=2, operators="+")
PAIRS = preference_pairs(TASK, 64, seed=0)


def config(tmp_path, **rm) -> dict:
    return {
        "model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic"},
        "data": {"train": "in-memory"},
        "rm": {"loss": "bradley_terry", **rm},
        "train": {"max_steps": 60, "batch_size": 32, "lr": 1e-2, "warmup_steps": 0},
        "output_dir": str(tmp_path / "run"),
    }


def test_reward_model_learns_its_pairs_and_saves_a_loadable_classifier(tmp_path):
    # Accuracy over the 64 training pairs (scored as eval rows): about chance from a random head, and
    # most pairs ranked right after 60 steps.
    cfg = as_config(RMConfig, config(tmp_path, loss_args={"center_coef": 0.01}))
    result = train_rm(cfg, train_rows=PAIRS, eval_rows=PAIRS, progress=False)
    assert result.initial_eval["eval_accuracy"] < 0.7
    assert result.final_eval["eval_accuracy"] >= 0.8
    assert result.final_eval["eval_accuracy"] > result.initial_eval["eval_accuracy"] + 0.25

    model = AutoModelForSequenceClassification.from_pretrained(result.final_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.final_dir)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    wins = 0
    with torch.no_grad():
        for p in PAIRS:
            scores = [
                model(**tokenizer(p["prompt"] + p[side] + tokenizer.eos_token, return_tensors="pt")).logits.item()
                for side in ("chosen", "rejected")
            ]
            wins += scores[0] > scores[1]
    assert wins / len(PAIRS) >= 0.75


def test_margin_column_reaches_the_loss(tmp_path):
    # A large margin keeps the Bradley-Terry loss high: -log sigmoid(r_c - r_r - 10) ~ 10 at the start.
    rows = [{**p, "margin": 10.0} for p in PAIRS]
    cfg = as_config(RMConfig, config(tmp_path), ["train.max_steps=1"])
    result = train_rm(cfg, train_rows=rows, progress=False)
    assert result.history[0]["loss"] == pytest.approx(10.0, abs=0.5)


def test_listwise_reward_model_trains_from_scored_completions(tmp_path):
    rows = feedback_rows(TASK, 32, seed=0, split="train", kind="listwise")
    cfg = as_config(RMConfig, config(tmp_path, loss="listwise_pl"), ["train.max_steps=30", "train.batch_size=16"])
    result = train_rm(cfg, train_rows=rows, eval_rows=rows, progress=False)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    first, last = result.history[:5], result.history[-5:]
    assert sum(h["loss"] for h in last) < sum(h["loss"] for h in first)


def test_unknown_reward_model_loss_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="registered: bradley_terry, listwise_pl"):
        as_config(RMConfig, config(tmp_path, loss="hinge"))
