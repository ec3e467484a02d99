"""Writes a later step reads are atomic, and a resume never silently changes the run (issue #21.5-6): final/ is
renamed in whole, a full disk and a read-only output_dir are one error, a resume with another config is refused
(naming what differs) or applies what may change and says so, a damaged newest checkpoint gives way to the newest
intact one, another trainer's checkpoints are refused, and trainer state loads without unpickling objects."""

import errno
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

import posttrain.trainers.lifecycle as lifecycle
from posttrain.api import rm, sft
from posttrain.config import ConfigError
from posttrain.runtime.checkpoint import STATE_FILE, Checkpointer, CheckpointError
from posttrain.tasks import ArithmeticTask
from posttrain.tasks.preference_data import feedback_rows

TASK = {"name": "arithmetic", "train_size": 200, "eval_size": 4}


def config(out: Path, **train: Any) -> dict[str, Any]:
    return {"model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic"}, "data": {"task": TASK},
            "train": {"max_steps": 4, "batch_size": 8, "lr": 3e-3, "save_every": 2, "keep_last": 3, **train},
            "eval": {"max_new_tokens": 2}, "output_dir": str(out)}  # fmt: skip


def test_a_kill_while_final_is_written_leaves_no_half_directory(tmp_path: Path, monkeypatch) -> None:
    sft(config(tmp_path), progress=False)
    before = sorted(p.name for p in (tmp_path / "final").iterdir())
    real = lifecycle.save_pretrained

    def dies_halfway(model, tokenizer, directory, *rest):
        if "final" in Path(directory).name:
            Path(directory).mkdir(parents=True)
            (Path(directory) / "config.json").write_text("{")  # half a model
            raise KeyboardInterrupt  # as a kill would stop it
        return real(model, tokenizer, directory, *rest)

    monkeypatch.setattr(lifecycle, "save_pretrained", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        sft(config(tmp_path, max_steps=5), resume=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == before  # the previous final/ is whole
    monkeypatch.setattr(lifecycle, "save_pretrained", real)
    sft(config(tmp_path, max_steps=5), resume=True, progress=False)  # the stale staging directory is cleaned up
    assert not list(tmp_path.glob(".tmp-final-*")) and (tmp_path / "final" / "config.json").is_file()


def test_a_full_disk_during_a_checkpoint_is_one_error_naming_the_directory(tmp_path: Path, monkeypatch) -> None:
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "checkpoints"))

    real_save = Checkpointer.save

    def save_on_a_full_disk(self, step, **kwargs):
        return real_save(self, step, **kwargs | {"save_model": full})

    monkeypatch.setattr(Checkpointer, "save", save_on_a_full_disk)
    with pytest.raises(CheckpointError) as info:
        sft(config(tmp_path), progress=False)
    message = str(info.value)
    assert "No space left on device" in message and str(tmp_path / "checkpoints") in message and "MiB free" in message
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # the staging directory is removed


def test_a_read_only_output_dir_is_one_error(tmp_path: Path, monkeypatch) -> None:
    real = Path.write_bytes

    def read_only(self, data):
        if self.name.startswith(".posttrain-write-test"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    with pytest.raises(ConfigError, match=r"output_dir: cannot write to .*Read-only file system"):
        sft(config(tmp_path), progress=False)


@pytest.mark.parametrize(
    ("change", "differs"),
    [
        ({"model": {"preset": "llama-tiny", "tokenizer": "arithmetic"}}, "model.preset"),
        ({"seed": 3}, "seed"),
        ({"train": {"batch_size": 4}}, "train.batch_size"),
        ({"data": {"task": {**TASK, "digits": 3}}}, "data.task.digits"),
    ],
)
def test_a_resume_that_would_change_the_run_is_refused(tmp_path: Path, change: dict, differs: str) -> None:
    sft(config(tmp_path, max_steps=2), progress=False)
    changed = config(tmp_path, max_steps=4)
    for key, value in change.items():
        changed[key] = {**changed[key], **value} if isinstance(value, dict) and key != "model" else value
    with pytest.raises(CheckpointError, match=rf"{differs}: .* -> "):
        sft(changed, resume=True, progress=False)


def test_a_resume_applies_a_new_learning_rate_and_more_steps_and_says_so(tmp_path: Path, capsys) -> None:
    sft(config(tmp_path, max_steps=2, schedule="constant", warmup_steps=0), progress=False)
    result = sft(config(tmp_path, max_steps=3, schedule="constant", warmup_steps=0, lr=1e-4), resume=True,
                 progress=False)  # fmt: skip
    printed = capsys.readouterr()
    said = printed.out + printed.err
    assert "train.lr 0.003 -> 0.0001, applied from step 2" in said and "train.max_steps 2 -> 3" in said
    assert [round(h["lr"], 10) for h in result.history] == [0.003, 0.003, 0.0001]


def test_another_trainers_checkpoints_are_refused(tmp_path: Path) -> None:
    sft(config(tmp_path, max_steps=2), progress=False)
    rows = feedback_rows(ArithmeticTask(digits=2, operators="+-"), 16, seed=0, split="train", kind="preference")
    rm_cfg = {"model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic"}, "train": {"max_steps": 3},
              "output_dir": str(tmp_path)}  # fmt: skip
    with pytest.raises(CheckpointError, match=r"written by `posttrain sft`, not `posttrain rm`"):
        rm(rm_cfg, train=rows, resume=True, progress=False)


@pytest.mark.parametrize("damage", ["truncate", "empty", "flip"])
def test_a_damaged_newest_checkpoint_gives_way_to_the_newest_intact_one(tmp_path: Path, damage: str, capsys) -> None:
    whole = sft(config(tmp_path / "whole", max_steps=4), progress=False).history
    sft(config(tmp_path / "cut", max_steps=4), progress=False)
    weights = tmp_path / "cut" / "checkpoints" / "step-00000004" / "model" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[: len(data) // 2], "empty": b"",
                         "flip": data[:-1] + bytes([data[-1] ^ 1])}[damage])  # fmt: skip
    resumed = sft(config(tmp_path / "cut", max_steps=4), resume=True, progress=False).history
    said = capsys.readouterr()
    assert "skipped damaged checkpoints step-00000004" in said.out + said.err
    assert [h["loss"] for h in resumed] == [h["loss"] for h in whole]  # steps 3 and 4 trained again from step 2


def test_trainer_state_loads_without_unpickling_objects(tmp_path: Path) -> None:
    sft(config(tmp_path, max_steps=2), progress=False)
    state_file = tmp_path / "checkpoints" / "step-00000002" / STATE_FILE
    state = torch.load(state_file, weights_only=True)  # everything it holds is tensors and plain values
    assert state["step"] == 2

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({**state, "evil": Payload()}, state_file, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(CheckpointError, match="weights_only"):
        Checkpointer(tmp_path).load_state(state_file.parent)
    manifest = json.loads((state_file.parent / "manifest.json").read_text())
    assert manifest["kind"] == "sft" and manifest["config"]["train.batch_size"] == 8
