"""`posttrain rm` with a stepwise loss trains a process reward model: it learns to tell right steps from wrong ones on
held-out rows, reads each label at its step's separator, and saves a model that AutoModelForTokenClassification
loads, and AutoModelForSequenceClassification as the score of a text's last token."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

from posttrain.api import as_config
from posttrain.config import ConfigError, RMConfig
from posttrain.trainers.reward_model import train_rm


def rows(n: int, seed: int) -> list[dict]:
    """Traces of 1-3 steps; a step is wrong when it writes 9 (a rule the model must read at each separator)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        steps = [f"{rng.randint(1, 8)}+{rng.randint(0, 9)}" if rng.random() < 0.5 else f"{rng.randint(1, 8)}+9"
                 for _ in range(rng.randint(1, 3))]  # fmt: skip
        out.append({"prompt": f"{rng.randint(10, 99)}=", "completions": steps,
                    "labels": [not s.endswith("9") for s in steps]})  # fmt: skip
    return out


def config(tmp_path, **rm) -> dict:
    return {
        "model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic"},
        "rm": {"loss": "process_bce", "step_separator": ";", **rm},
        "train": {"max_steps": 40, "batch_size": 32, "lr": 1e-2, "warmup_steps": 0},
        "output_dir": str(tmp_path / "run"),
    }


def test_a_process_reward_model_learns_which_steps_are_wrong_and_saves_both_heads(tmp_path):
    cfg = as_config(RMConfig, config(tmp_path))
    result = train_rm(cfg, train_rows=rows(256, 0), eval_rows=rows(64, 1), progress=False)
    before, after = result.initial_eval, result.final_eval
    assert after["eval_steps"] == before["eval_steps"] > 64
    # a random head predicts one class for most steps: one recall high, the other low; trained, both high
    assert min(before["eval_right_step_recall"], before["eval_wrong_step_recall"]) < 0.6
    assert after["eval_step_accuracy"] >= 0.9
    assert min(after["eval_right_step_recall"], after["eval_wrong_step_recall"]) >= 0.85
    assert all(0 <= h["accuracy"] <= 1 for h in result.history)

    tokenizer = AutoTokenizer.from_pretrained(result.final_dir)
    per_token = AutoModelForTokenClassification.from_pretrained(result.final_dir).eval()
    per_text = AutoModelForSequenceClassification.from_pretrained(result.final_dir).eval()
    ids = torch.tensor([tokenizer("41=3+4;5+9;")["input_ids"]])
    with torch.no_grad():
        logits = per_token(input_ids=ids).logits[0, :, 0]
        separators = (ids[0] == tokenizer.convert_tokens_to_ids(";")).nonzero().flatten()
        assert logits[separators[0]] > 0 > logits[separators[1]]  # 3+4 right, 5+9 wrong
        torch.testing.assert_close(per_text(input_ids=ids).logits[0, 0], logits[-1])


def test_train_on_last_step_only_trains_on_each_rows_last_label_and_evaluates_every_label(tmp_path):
    # every trace: a right step then a wrong one. Trained on the last labels only, the model has seen wrong steps
    # only and calls the held-out right steps wrong too; trained on every label, it tells them apart
    traces = [{"prompt": f"{n}=", "completions": [f"{n % 9}+1", f"{n % 9}+9"], "labels": [True, False]}
              for n in range(10, 74)]  # fmt: skip
    last_only = train_rm(as_config(RMConfig, config(tmp_path, train_on_last_step_only=True)), train_rows=traces,
                         eval_rows=traces, progress=False).final_eval  # fmt: skip
    every = train_rm(as_config(RMConfig, config(tmp_path / "every")), train_rows=traces, eval_rows=traces,
                     progress=False).final_eval  # fmt: skip
    assert last_only["eval_steps"] == every["eval_steps"] == 128
    assert last_only["eval_right_step_recall"] < 0.5 < 0.9 < every["eval_right_step_recall"]
    assert last_only["eval_wrong_step_recall"] > 0.9


def test_the_arithmetic_task_gives_stepwise_rows_for_a_stepwise_loss(tmp_path):
    raw = config(tmp_path) | {"data": {"task": {"name": "arithmetic", "train_size": 64, "eval_size": 16}}}
    result = train_rm(as_config(RMConfig, raw, ["train.max_steps=2"]), progress=False)
    assert result.final_eval["eval_steps"] >= 32  # 16 traces of 2-3 steps


def test_preference_rows_for_a_stepwise_loss_name_the_missing_fields(tmp_path):
    cfg = as_config(RMConfig, config(tmp_path), ["train.max_steps=1"])
    with pytest.raises(Exception, match="expected 'prompt' \\+ 'completions' \\(the steps\\) \\+ 'labels'"):
        train_rm(cfg, train_rows=[{"prompt": "1=", "chosen": "1", "rejected": "2"}], progress=False)


def test_unknown_reward_model_loss_lists_the_process_loss(tmp_path):
    with pytest.raises(ConfigError, match="process_bce"):
        as_config(RMConfig, config(tmp_path, loss="prm"))


def test_a_bad_stepwise_row_in_a_file_stops_the_run_naming_file_line_and_field(tmp_path):
    import json

    from posttrain.data import DataError

    path = tmp_path / "steps.jsonl"
    good = {"prompt": "1=", "completions": ["1+1", "2+9"], "labels": [True, False]}
    bad = {"prompt": "2=", "completions": ["1+1", "2+2"], "labels": [True]}
    path.write_text("\n".join(json.dumps(r) for r in (good, bad)) + "\n")
    raw = config(tmp_path) | {"data": {"train": str(path)}}
    with pytest.raises(DataError, match=r"steps\.jsonl line 2: field 'labels': expected a list of 2 labels"):
        train_rm(as_config(RMConfig, raw, ["train.max_steps=1"]), progress=False)
    empty = {"prompt": "3=", "completions": [], "labels": []}
    path.write_text("\n".join(json.dumps(r) for r in (good, good, empty)) + "\n")
    with pytest.raises(DataError, match=r"steps\.jsonl line 3: field 'completions': expected a non-empty list"):
        train_rm(as_config(RMConfig, raw, ["train.max_steps=1"]), progress=False)
