"""`posttrain pref`: one forward for chosen and rejected, reference modes, a DPO run that learns its
pairs, the other loss shapes (IPO, SimPO reference-free, KTO unpaired), config errors, and resume."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from posttrain.api import as_config
from posttrain.config import ConfigError, PrefConfig
from posttrain.data import PreferenceTokens, collate_preference, collate_sequences
from posttrain.policies import build_model
from posttrain.tasks import ArithmeticTask, build_builtin_tokenizer
from posttrain.tasks.preference_data import digit_slip, feedback_rows, preference_pairs
from posttrain.trainers.preference import train_pref
from posttrain.trainers.preference_step import sequence_logps

TASK = ArithmeticTask(digits=2, operators="+")
PAIRS = preference_pairs(TASK, 64, seed=0)
RECIPES = Path(__file__).parents[2] / "recipes"


def config(tmp_path, **pref) -> dict:
    return {
        "model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic"},
        "data": {"train": "in-memory"},
        "pref": {"loss": "dpo", "loss_args": {"beta": 0.5}, **pref},
        "train": {"max_steps": 4, "batch_size": 16, "lr": 1e-2, "warmup_steps": 0},
        "eval": {"limit": 64},
        "output_dir": str(tmp_path / "run"),
    }


def run(tmp_path, rows=PAIRS, eval_rows=None, overrides=(), **pref):
    cfg = as_config(PrefConfig, config(tmp_path, **pref), list(overrides))
    return train_pref(cfg, train_rows=rows, eval_rows=eval_rows, progress=False)


def test_digit_slip_is_a_wrong_answer_one_digit_off():
    import random

    rng = random.Random(0)
    for answer in ("95", "7", "-12", "100"):
        for _ in range(20):
            wrong = digit_slip(answer, rng)
            assert wrong != answer
            diff = abs(int(wrong) - int(answer))
            assert diff in (1, 10, 100)
    assert all(p["chosen"] == p["answer"] != p["rejected"] for p in PAIRS)


def test_concatenated_forward_equals_two_separate_forwards():
    tokenizer = build_builtin_tokenizer("arithmetic")
    model = build_model("qwen2-tiny", tokenizer, seed=0).eval()
    items = [
        PreferenceTokens(
            tokenizer(p["prompt"]).input_ids,
            [*tokenizer(p["chosen"]).input_ids, 2],
            [*tokenizer(p["rejected"] + "1").input_ids, 2],
            "x",
        )
        for p in PAIRS[:5]
    ]
    both, _ = sequence_logps(model, collate_preference(items, pad_id=0), torch.device("cpu"), bf16=False)

    def alone(side: str) -> torch.Tensor:
        ids = [it.prompt_ids + getattr(it, side) for it in items]
        masks = [[False] * len(it.prompt_ids) + [True] * len(getattr(it, side)) for it in items]
        return sequence_logps(model, collate_sequences(ids, masks, pad_id=0), torch.device("cpu"), bf16=False)[0]

    # rows alternate chosen, rejected
    expected = torch.stack([alone("chosen_ids"), alone("rejected_ids")], dim=1).flatten()
    torch.testing.assert_close(both, expected, atol=1e-5, rtol=0)


def test_precomputed_reference_equals_on_the_fly(tmp_path):
    pre = run(tmp_path / "pre", overrides=["train.max_steps=2"], reference="precomputed")
    fly = run(tmp_path / "fly", overrides=["train.max_steps=2"], reference="on_the_fly")
    assert pre.history[0]["loss"] == pytest.approx(fly.history[0]["loss"], abs=1e-6)
    assert pre.history[1]["loss"] == pytest.approx(fly.history[1]["loss"], abs=1e-5)
    assert pre.reference_built and fly.reference_built


def test_dpo_learns_its_preferences(tmp_path):
    # Implicit-reward accuracy on the 64 training pairs: at step 0 every reward is 0 (policy = reference),
    # so no pair counts as won; after 40 steps nearly all are won and the margin is clearly positive.
    held = [{k: v for k, v in p.items() if k != "answer"} for p in PAIRS]
    result = run(tmp_path, eval_rows=held, overrides=["train.max_steps=40", "train.batch_size=32"])
    assert result.initial_eval["eval_pref_accuracy"] == 0.0
    assert result.final_eval["eval_pref_accuracy"] >= 0.9
    assert result.final_eval["eval_reward_margin"] > 1.0
    first, last = result.history[:5], result.history[-5:]
    assert sum(h["pref_accuracy"] for h in last) / 5 > sum(h["pref_accuracy"] for h in first) / 5 + 0.2
    assert (result.final_dir / "config.json").is_file()


@pytest.mark.parametrize(
    ("loss", "args", "reference"),
    [
        ("ipo", {"tau": 0.1}, "precomputed"),
        ("simpo", {"beta": 2.0, "gamma": 1.0}, "none"),
        ("kto", {"beta": 0.1}, "on_the_fly"),
    ],
)
def test_other_losses_run_with_finite_losses(tmp_path, loss, args, reference):
    rows = feedback_rows(TASK, 32, seed=0, split="train", kind="unpaired") if loss == "kto" else PAIRS
    result = run(tmp_path, rows=rows, loss=loss, loss_args=args, reference=reference)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    if loss == "simpo":
        assert not result.reference_built  # reference-free: no reference model is ever built
    if loss == "kto":
        assert all(h["kl_ref_point"] >= 0.0 for h in result.history)


def test_reference_none_with_a_loss_that_needs_one_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"pref\.reference"):
        as_config(PrefConfig, config(tmp_path, reference="none"))


def test_unknown_loss_lists_the_registered_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"not registered; registered: .*dpo.*simpo"):
        as_config(PrefConfig, config(tmp_path, loss="dpo_v9"))


def test_unknown_loss_arg_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="betta"):
        as_config(PrefConfig, config(tmp_path, loss_args={"betta": 0.1}))


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    overrides = ["train.max_steps=6", "train.save_every=3", "train.keep_last=5"]
    full = run(tmp_path / "full", overrides=overrides)
    shutil.copytree(
        tmp_path / "full" / "run" / "checkpoints" / "step-00000003",
        tmp_path / "part" / "run" / "checkpoints" / "step-00000003",
    )
    cfg = as_config(PrefConfig, config(tmp_path / "part"), overrides)
    resumed = train_pref(cfg, train_rows=PAIRS, resume=True, progress=False)
    assert [h["step"] for h in resumed.history] == list(range(1, 7))
    for a, b in zip(full.history, resumed.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def test_resume_keeps_the_evaluations_logged_before_the_checkpoint(tmp_path) -> None:
    # the initial evaluation (step 0) is logged, not kept in the history: a resume from step 2 used to rewrite
    # metrics.jsonl from the history alone and lose it; the final one (step 4) is made once, by the resumed run
    import json

    from posttrain import api

    rows = feedback_rows(TASK, 40, seed=0, split="train", kind="preference")
    held_out = feedback_rows(TASK, 8, seed=0, split="eval", kind="preference")

    def run(out, resume=False):
        config = {"model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic"},
                  "data": {},
                  "train": {"max_steps": 4, "batch_size": 8, "save_every": 2, "keep_last": 5}, "eval": {"limit": 8},
                  "output_dir": str(out)}  # fmt: skip
        api.pref(config, train=rows, eval=held_out, resume=resume, progress=False)
        return [(r["kind"], r["step"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]

    whole = run(tmp_path / "whole")
    assert whole == [("eval", 0), ("train", 1), ("train", 2), ("train", 3), ("train", 4), ("eval", 4)]
    run(tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-00000004")  # as if it had stopped after step 2
    assert run(tmp_path / "resumed", resume=True) == whole


def test_a_loss_that_couples_the_steps_pairs_refuses_micro_batches(tmp_path) -> None:
    # AOT sorts the step's margins: split over micro-batches its value would change (found by an audit); the
    # config says so before any model is built, and the whole step in one call is allowed
    with pytest.raises(ConfigError, match=r"train.micro_batch_size: 4 splits the step.*'aot' couples"):
        as_config(PrefConfig, config(tmp_path, loss="aot"), ["train.micro_batch_size=4"])
    for allowed in ([], ["train.micro_batch_size=16"], ["train.micro_batch_size=32"]):
        as_config(PrefConfig, config(tmp_path, loss="aot"), allowed)
    as_config(PrefConfig, config(tmp_path), ["train.micro_batch_size=4"])  # DPO's loss is per pair


@pytest.mark.parametrize("loss", ["ipo", "orpo", "sppo_hard", "simpo", "dpo"])
def test_every_loss_runs_on_its_own_defaults(tmp_path, loss) -> None:
    # the default loss_args are the loss's own: a config-wide beta of 0.1 made ipo, orpo, sppo_hard and nll
    # (which take no beta) fail until loss_args was emptied, and gave SimPO 0.1 for its paper's 2.0 (audit)
    cfg = config(tmp_path, loss=loss)
    del cfg["pref"]["loss_args"]
    reference = {"simpo": "none", "orpo": "none"}.get(loss)
    if reference:
        cfg["pref"]["reference"] = reference
    parsed = as_config(PrefConfig, cfg, ["train.max_steps=1"])
    assert parsed.pref.loss_args == {}
    history = train_pref(parsed, train_rows=PAIRS, progress=False).history
    assert len(history) == 1 and math.isfinite(history[0]["loss"])


def test_reference_precompute_shows_its_progress_unless_progress_is_off(tmp_path, capsys):
    # 64 pairs in batches of 16: 4 batches of the train set, 4 of the held-out set (64 rows, eval.limit 64)
    cfg = as_config(PrefConfig, config(tmp_path, reference="precomputed"), ["train.max_steps=1"])
    train_pref(cfg, train_rows=PAIRS, eval_rows=PAIRS, progress=True)
    err = capsys.readouterr().err
    assert "reading and encoding the data: " in err
    assert "reference log-probs of the train examples: 4 batches in " in err
    assert "reference log-probs of the eval examples: 4 batches in " in err
    assert "held-out pairs, 64 examples: 4 batches in " in err and "checkpoint of step 1: " in err
    shutil.rmtree(tmp_path / "run")
    train_pref(cfg, train_rows=PAIRS, eval_rows=PAIRS, progress=False)
    err = capsys.readouterr().err
    assert not any(s in err for s in ("reading", "reference log-probs", "held-out pairs", "checkpoint of"))


def test_kto_reference_point_pairs_each_prompt_with_the_previous_completion(monkeypatch):
    # TRL 1.16's KTOTrainer rotates completions by +1 (trl/trainer/kto_trainer.py:1141-1152):
    # (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}). Policy log-prob of a pair here: prompt id * completion id;
    # reference 0. Items (prompt, completion): (1, 5), (2, 7), (3, 4), (4, 9)
    #   -> pairs (1, 9), (2, 5), (3, 7), (4, 4) -> 9, 10, 21, 16 -> z0 = 56 / 4 = 14
    #   (the other rotation, (1, 7), (2, 4), (3, 9), (4, 5), would give 62 / 4 = 15.5)
    import contextlib
    from types import SimpleNamespace

    import posttrain.trainers.preference_step as offline
    from posttrain.data import CompletionTokens

    items = [CompletionTokens([p], [c], f"row {i}") for i, (p, c) in enumerate([(1, 5), (2, 7), (3, 4), (4, 9)])]
    monkeypatch.setattr(offline, "collate_completions", lambda shifted, pad_id: (shifted,))

    def logps(model, shifted, device, bf16):
        values = [float(it.prompt_ids[0] * it.completion_ids[0]) for it in shifted] if model == "policy" else [0.0] * 4
        return torch.tensor(values), None

    monkeypatch.setattr(offline, "sequence_logps", logps)
    reference = SimpleNamespace(model="reference", active=contextlib.nullcontext)
    z0 = offline.kl_reference_point("policy", reference, items, 0, torch.device("cpu"), False)
    assert z0.item() == pytest.approx(14.0)


OFFLINE_PRESETS = ["dpo", "ipo", "simpo", "kto", "robust_dpo", "hinge", "nca", "exo", "apo_zero", "apo_down", "aot",
                   "sppo_hard", "rpo", "dpop", "bco", "cpo", "orpo", "lipo_lambda", "plackett_luce", "cpl"]  # fmt: skip
PRESET_SMOKE = ["model.preset=qwen2-tiny", "model.tokenizer=arithmetic", "data.train=null", "data.task.digits=1",
                "data.task.train_size=32", "data.task.eval_size=8", "train.max_steps=2", "train.batch_size=8",
                "train.warmup_steps=0", "eval.limit=8"]  # fmt: skip


@pytest.mark.parametrize("name", OFFLINE_PRESETS)
def test_offline_presets_run_on_the_task_with_the_loss_they_name(tmp_path, name) -> None:
    # each arith-self-* preset with a fresh tiny model and the task's generated rows in place of the SFT model and its
    # self-made set (bench/preference_demo.py builds those): the recipe's loss and arguments run two finite steps
    from posttrain.api import pref
    from posttrain.config import load_config

    recipe = RECIPES / f"arith-self-{name}.yaml"
    cfg = load_config(PrefConfig, recipe, [*PRESET_SMOKE, f"output_dir={tmp_path}"])
    assert cfg.pref.loss == name and cfg.online is None
    history = pref(cfg, progress=False).history
    assert len(history) == 2 and all(math.isfinite(h["loss"]) for h in history)


def test_the_listwise_reward_model_preset_trains_on_lists(tmp_path) -> None:
    from posttrain.api import rm
    from posttrain.config import RMConfig, load_config

    cfg = load_config(RMConfig, RECIPES / "arith-self-rm_listwise.yaml", [*PRESET_SMOKE, f"output_dir={tmp_path}"])
    assert cfg.rm.loss == "listwise_pl"
    history = rm(cfg, progress=False).history
    assert len(history) == 2 and all(math.isfinite(h["loss"]) for h in history)
