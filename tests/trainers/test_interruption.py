"""A training process stopped from outside (issue #6): SIGTERM ends it cleanly after its step with a
checkpoint and the command that resumes it; SIGKILL in the middle of a checkpoint write leaves the
previous checkpoint loadable, and the run resumes from it as if nothing had happened."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from posttrain.cli import main
from posttrain.config import SFTConfig, validate
from posttrain.policies import load_model
from posttrain.runtime.checkpoint import STATE_FILE, Checkpointer, model_dir
from posttrain.trainers.sft import train_sft

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def sft_config(out: Path, **train: Any) -> dict[str, Any]:
    return {
        "model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic"},
        "data": {"task": {"name": "arithmetic", "train_size": 200, "eval_size": 4}},
        "train": {"batch_size": 8, "lr": 3e-3, "warmup_steps": 0, **train},
        "eval": {"max_new_tokens": 2},
        "output_dir": str(out),
    }


def wait_for(condition: Any, proc: subprocess.Popen, stderr: Path, what: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the child exited ({proc.returncode}) before {what}:\n{stderr.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {what} after {timeout_s} s:\n{stderr.read_text()}")
        time.sleep(0.05)


def train_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.is_file() else ""
    complete = text[: text.rfind("\n") + 1]  # the child may be writing the last line
    return [json.loads(x)["step"] for x in complete.splitlines() if '"train"' in x]


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_prints_how_to_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = [
        "model.preset=qwen2-tiny",
        "model.tokenizer=arithmetic",
        "data.task.name=arithmetic",
        "data.task.train_size=200",
        "data.task.eval_size=4",
        "train.batch_size=8",
        "train.max_steps=100000",  # far more than the test waits for
        "eval.max_new_tokens=2",
        f"output_dir={out}",
    ]
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "posttrain.cli", "sft", *overrides], stdout=err, stderr=err, env=ENV
        )
        wait_for(lambda: len(train_steps(out)) >= 3, proc, stderr, "3 logged steps")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    printed = stderr.read_text()
    steps = train_steps(out)
    k = steps[-1]
    assert code == 143, printed  # 128 + SIGTERM: stopped, not finished
    assert steps == list(range(1, k + 1))  # the step under way was finished and logged, and no other
    checkpoint = out / "checkpoints" / f"step-{k:08d}"
    assert f"stopped by SIGTERM after step {k}; checkpoint written: {checkpoint}" in printed
    resume = next(line for line in printed.splitlines() if line.startswith("resume with: "))
    assert resume == "resume with: " + shlex.join(["posttrain", "sft", *overrides, "--resume"])
    assert "Traceback" not in printed
    assert Checkpointer(out).latest() == checkpoint and not (out / "final").exists()
    # the printed command resumes (here with a near max_steps, which a later override sets)
    argv = shlex.split(resume.removeprefix("resume with: "))[1:]
    assert main([*argv[:-1], f"train.max_steps={k + 2}", "--resume"]) == 0
    assert train_steps(out) == list(range(1, k + 3))
    assert (out / "final" / "config.json").is_file()


KILLED_MID_WRITE = """
import json, pathlib, sys, time

import posttrain.trainers.lifecycle as run_state
from posttrain.api import sft

real_save_pretrained = run_state.save_pretrained
marker = pathlib.Path(sys.argv[2])


def save_then_hang(model, tokenizer, directory, *rest):
    real_save_pretrained(model, tokenizer, directory, *rest)
    if ".tmp-step-00000004-" in str(directory):  # step 4's model is written, its trainer state is not yet
        marker.write_text("mid-write")
        time.sleep(600)


run_state.save_pretrained = save_then_hang
sft(json.loads(sys.argv[1]), progress=False)
"""


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_to_resume_from(tmp_path: Path) -> None:
    cfg = sft_config(tmp_path / "run", max_steps=6, save_every=2, keep_last=3)
    script, marker, stderr = tmp_path / "child.py", tmp_path / "marker", tmp_path / "stderr.txt"
    script.write_text(KILLED_MID_WRITE)
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(script), json.dumps(cfg), str(marker)], stdout=err, stderr=err, env=ENV
        )
        wait_for(marker.exists, proc, stderr, "the checkpoint write of step 4")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    checkpoints = Checkpointer(tmp_path / "run")
    staging = checkpoints.root / f".tmp-step-00000004-{proc.pid}"
    assert sorted(p.name for p in checkpoints.root.iterdir()) == [staging.name, "step-00000002"]
    assert (staging / "model" / "config.json").is_file() and not (staging / STATE_FILE).exists()
    # the half-written step 4 is invisible: the newest checkpoint is step 2, and it loads
    previous = checkpoints.latest()
    assert previous == checkpoints.root / "step-00000002"
    assert checkpoints.load_state(previous)["step"] == 2
    load_model(model_dir(previous))
    # resuming from it gives the run that was never killed (same losses, up to float rounding)
    resumed = train_sft(validate(SFTConfig, cfg), resume=True, progress=False)
    whole = train_sft(validate(SFTConfig, sft_config(tmp_path / "whole", max_steps=6)), progress=False)
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4, 5, 6]
    losses = torch.tensor([[h["loss"] for h in r.history] for r in (resumed, whole)])
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=0)
    assert not staging.exists()  # the next save cleaned up after the killed process
