"""Reliability inside the loops (issue #6): a NaN/inf loss skips the update (SFT, preference, reward
model) and enough in a row stop the run with the last checkpoint kept; a reward that raises on one
prompt fails only that prompt's samples and the RL run goes on."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import posttrain.trainers.preference_step as preference_trainer
import posttrain.trainers.reward_model as reward_model_trainer
import posttrain.trainers.sft as sft_trainer
from posttrain.api import as_config, rl
from posttrain.cli import main
from posttrain.config import PrefConfig, RMConfig, SFTConfig, validate
from posttrain.runtime.guards import TrainingStopped
from posttrain.tasks import ArithmeticTask
from posttrain.tasks.preference_data import preference_pairs
from posttrain.trainers.preference import train_pref
from posttrain.trainers.reward_model import train_rm
from posttrain.trainers.sft import train_sft

PAIRS = preference_pairs(ArithmeticTask(digits=2, operators="+"), 32, seed=0)


def sft_config(out: Path, **train: Any) -> dict[str, Any]:
    return {
        "model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic"},
        "data": {"task": {"name": "arithmetic", "train_size": 200, "eval_size": 4}},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 3e-3, "warmup_steps": 0, **train},
        "eval": {"max_new_tokens": 2},
        "output_dir": str(out),
    }


def poison(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, bad_calls: set[int]) -> None:
    """Make `module.name`'s result NaN (with its graph, so that the gradients are NaN too) on the
    1-based calls in `bad_calls` that build a graph; each trainer below makes one such call per training step
    (held-out evaluations, before and after training, run without gradients and are not counted)."""
    real, calls = getattr(module, name), []

    def maybe_nan(*args: Any, **kwargs: Any) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return real(*args, **kwargs)
        calls.append(1)
        out = real(*args, **kwargs)
        return out * math.nan if len(calls) in bad_calls else out

    monkeypatch.setattr(module, name, maybe_nan)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_sft_skips_non_finite_updates_and_keeps_the_weights_of_the_last_good_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    constant = {"schedule": "constant"}  # so that the learning rate of steps 1, 2 does not depend on max_steps
    clean = train_sft(validate(SFTConfig, sft_config(tmp_path / "a", max_steps=2, **constant)), progress=False)
    poison(monkeypatch, sft_trainer, "token_mean", {3, 4})
    poisoned = train_sft(validate(SFTConfig, sft_config(tmp_path / "b", max_steps=4, **constant)), progress=False)
    history = poisoned.history
    assert [h["skipped_steps"] for h in history] == [0, 0, 1, 2]
    assert all(math.isnan(h["loss"]) and math.isnan(h["grad_norm"]) for h in history[2:])
    # steps 1, 2 are the clean run's; steps 3, 4 took no update, so the weights are the clean run's exactly
    assert [h["loss"] for h in history[:2]] == [h["loss"] for h in clean.history]
    for name, tensor in weights(poisoned.model).items():
        assert torch.equal(tensor, clean.model.state_dict()[name]), name


def test_sft_stops_after_max_bad_steps_in_a_row_keeping_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    poison(monkeypatch, sft_trainer, "token_mean", set(range(3, 100)))
    cfg = sft_config(tmp_path, max_steps=10, save_every=2, max_bad_steps=2)
    with pytest.raises(TrainingStopped) as stopped:
        train_sft(validate(SFTConfig, cfg), progress=False)
    kept = tmp_path / "checkpoints" / "step-00000002"
    assert str(stopped.value).startswith("step 4: 2 optimiser updates in a row had a non-finite loss or gradient")
    assert f"the newest checkpoint, {kept}, is kept" in str(stopped.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002"]
    assert not (tmp_path / "final").exists()
    # the CLI reports it as one line and exits 2 (calls 1-4 above are used up: its steps 1, 2 are bad)
    capsys.readouterr()
    code = main(["sft", *[f"{k}={v}" for k, v in _flat(cfg | {"output_dir": str(tmp_path / "cli")})]])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-2:]
    assert code == 2 and last[0].startswith("error: step 2: 2 optimiser updates in a row")
    assert "no checkpoint had been written yet" in last[0] and "Traceback" not in err
    assert last[1] == "(run again with --debug for the traceback)"
    # once the cause is gone, the run resumes from the kept checkpoint
    monkeypatch.undo()
    cfg["train"]["max_steps"] = 4
    resumed = train_sft(validate(SFTConfig, cfg), resume=True, progress=False)
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    assert [h["skipped_steps"] for h in resumed.history] == [0, 0, 0, 0]


def _flat(raw: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in raw.items():
        if isinstance(value, dict):
            items += _flat(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


@pytest.mark.parametrize("trainer", ["pref", "rm"])
def test_preference_and_reward_model_loops_skip_a_non_finite_update(
    trainer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = preference_trainer if trainer == "pref" else reward_model_trainer
    poison(monkeypatch, module, "call_with", {2})
    config = {
        "model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic"},
        "data": {"train": "in-memory"},
        "train": {"max_steps": 3, "batch_size": 16, "lr": 1e-2, "warmup_steps": 0},
        "output_dir": str(tmp_path),
    }
    if trainer == "pref":
        result = train_pref(as_config(PrefConfig, config), train_rows=PAIRS, progress=False)
    else:
        result = train_rm(as_config(RMConfig, config), train_rows=PAIRS, progress=False)
    history = result.history
    assert [h["skipped_steps"] for h in history] == [0, 1, 1]
    assert math.isnan(history[1]["loss"]) and math.isfinite(history[2]["loss"])
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_a_reward_that_raises_on_one_prompt_fails_only_its_samples_and_rl_goes_on(tmp_path: Path) -> None:
    poisoned_prompt: list[str] = []

    def strict(*, prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        """Raises for the whole batch when it holds the first prompt it ever saw (a batch-wise bug)."""
        poisoned_prompt[:] = poisoned_prompt or prompts[:1]
        if poisoned_prompt[0] in prompts:
            raise ValueError(f"cannot score {poisoned_prompt[0]!r}")
        return [float(len(c)) for c in completions]

    config = {
        "model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic"},
        "data": {"train": "in-memory"},
        "train": {"max_steps": 2},
        "rl": {"prompts_per_step": 4, "group_size": 3, "sampling": {"max_new_tokens": 4}},
        "output_dir": str(tmp_path),
    }
    rows = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(20)]  # 20 distinct prompts
    history = rl(config, train=rows, rewards=[strict], progress=False).history
    # step 1: the 3 completions of the poisoned prompt fail (3 of 12 <= max_failure_fraction 0.5); the
    # other 9 are scored. Step 2 draws 4 other prompts (an epoch holds each prompt once): nothing fails.
    assert [h["rewards/strict/failures"] for h in history] == [3.0, 0.0]
    assert (tmp_path / "final" / "config.json").is_file()


def test_reward_model_resume_is_bitwise_the_uninterrupted_run(tmp_path: Path) -> None:
    def config(out: Path) -> RMConfig:
        train = {"max_steps": 6, "batch_size": 16, "lr": 1e-2, "warmup_steps": 0, "save_every": 3, "keep_last": 5}
        model = {"preset": "qwen2-tiny", "tokenizer": "arithmetic"}
        return as_config(
            RMConfig, {"model": model, "data": {"train": "in-memory"}, "train": train, "output_dir": str(out)}
        )

    full = train_rm(config(tmp_path / "full"), train_rows=PAIRS, progress=False)
    # the run stopped right after step 3's checkpoint: only that checkpoint exists
    step_3 = Path("checkpoints") / "step-00000003"
    shutil.copytree(tmp_path / "full" / step_3, tmp_path / "cut" / step_3)
    resumed = train_rm(config(tmp_path / "cut"), train_rows=PAIRS, resume=True, progress=False)
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4, 5, 6]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    for name, tensor in resumed.model.state_dict().items():
        assert torch.equal(tensor, full.model.state_dict()[name]), name
