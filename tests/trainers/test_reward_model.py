"""`posttrain rm`: a scalar-head reward model learns its pairs, saves a directory that
AutoModelForSequenceClassification loads, and trains listwise from scored completions."""

from __future__ import annotations

import math

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
    with pytest.raises(ConfigError, match="registered: bradley_terry, listwise_pl, process_bce"):
        as_config(RMConfig, config(tmp_path, loss="hinge"))


def test_an_ensembles_preference_strength_is_each_pairs_margin(tmp_path):
    # the ensemble is the run's own initial model (same preset and seed): its strength d_0 on each pair is the
    # margin, so the first step's loss is -log sigmoid(d_0 - d_0) = log 2 exactly; without it, it is not
    from posttrain.policies import build_reward_model
    from posttrain.tasks import build_builtin_tokenizer

    tokenizer = build_builtin_tokenizer("arithmetic")
    member = build_reward_model(path=None, preset="qwen2-tiny", tokenizer=tokenizer, seed=0)
    member.save_pretrained(tmp_path / "member")
    tokenizer.save_pretrained(tmp_path / "member")
    with_margin = as_config(RMConfig, config(tmp_path, margin_models=[str(tmp_path / "member")]),
                            ["train.max_steps=1"])  # fmt: skip
    plain = as_config(RMConfig, config(tmp_path / "plain"), ["train.max_steps=1"])
    assert train_rm(with_margin, train_rows=PAIRS, progress=False).history[0]["loss"] == pytest.approx(
        math.log(2), abs=1e-5)
    assert abs(train_rm(plain, train_rows=PAIRS, progress=False).history[0]["loss"] - math.log(2)) > 1e-3


def test_margin_models_need_a_loss_that_takes_a_margin(tmp_path):
    with pytest.raises(ConfigError, match=r"rm\.margin_models: rm\.loss 'listwise_pl' takes no margin"):
        as_config(RMConfig, config(tmp_path, loss="listwise_pl", margin_models=["x"]))


def test_held_out_accuracy_by_margin_bucket(tmp_path):
    # the model's own |margin| quartiles (16 pairs each), and the rows' margin column at each of its values
    rows = [{**p, "margin": float(i % 2)} for i, p in enumerate(PAIRS)]
    cfg = as_config(RMConfig, config(tmp_path), ["train.max_steps=5"])
    final = train_rm(cfg, train_rows=rows, eval_rows=rows, progress=False).final_eval
    quartiles = [final[f"eval_margin_q{i}_accuracy"] for i in range(1, 5)]
    assert all(0 <= a <= 1 for a in quartiles)
    assert sum(quartiles) / 4 == pytest.approx(final["eval_accuracy"])  # equal buckets average to the whole
    assert final["eval_label_margin_0_pairs"] == final["eval_label_margin_1_pairs"] == 32
    whole = (final["eval_label_margin_0_accuracy"] + final["eval_label_margin_1_accuracy"]) / 2
    assert whole == pytest.approx(final["eval_accuracy"])
