"""KTO and BCO train on preference pairs as TRL's KTO trainer does (issue #25.4): each pair becomes a desirable and
an undesirable completion; pref.max_prompt_length cuts the prompts the run trains on."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.api import pref
from posttrain.config import PrefConfig, load_config
from posttrain.tasks import build_builtin_tokenizer
from posttrain.trainers.splits import load_feedback

PAIRS = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)} for a in range(6) for b in range(6)]


def config(tmp_path: Path, loss: str, **pref_section) -> dict:
    return {"model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic"}, "data": {"train": "in-memory",
            "max_length": 16}, "pref": {"loss": loss, **pref_section}, "train": {"max_steps": 2, "batch_size": 8},
            "log": {"to": []}, "output_dir": str(tmp_path / loss)}  # fmt: skip


def test_pairs_become_one_desirable_and_one_undesirable_completion_each(tmp_path: Path) -> None:
    cfg = load_config(PrefConfig, config(tmp_path, "kto"))
    split = load_feedback(cfg.data, "unpaired", "train", build_builtin_tokenizer("arithmetic"), seed=0,
                          recipe_dir=None, rows=PAIRS)  # fmt: skip
    assert len(split.tokens) == 2 * len(PAIRS)
    assert [t.label for t in split.tokens[:4]] == [True, False, True, False]
    assert split.tokens[0].prompt_ids == split.tokens[1].prompt_ids  # the pair's prompt, on both sides


@pytest.mark.parametrize("loss", ["kto", "bco"])
def test_kto_and_bco_train_on_pairs(loss: str, tmp_path: Path) -> None:
    history = pref(config(tmp_path, loss), train=PAIRS, progress=False).history
    assert len(history) == 2 and all(h["loss"] == h["loss"] for h in history)  # ran, and no NaN


def test_max_prompt_length_cuts_the_prompts_a_run_trains_on(tmp_path: Path) -> None:
    cfg = load_config(PrefConfig, config(tmp_path, "dpo", max_prompt_length=2))
    tokenizer = build_builtin_tokenizer("arithmetic")
    split = load_feedback(cfg.data, "preference", "train", tokenizer, seed=0, recipe_dir=None, rows=PAIRS,
                          max_prompt_length=cfg.pref.max_prompt_length)  # fmt: skip
    assert all(t.prompt_ids == tokenizer(r["prompt"])["input_ids"][-2:] for t, r in zip(split.tokens, PAIRS))
    assert split.report.truncated == len(PAIRS)  # every "a+b=" prompt is longer than 2 tokens
