"""Atomic checkpoints: complete or absent, newest wins, old ones pruned, crash leftovers ignored."""

import os
from pathlib import Path

import pytest
import torch

from posttrain.runtime.checkpoint import MODEL_DIR, STATE_FILE, Checkpointer, CheckpointError, model_dir


def write_model(directory: Path) -> None:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")


def save(ckpt: Checkpointer, step: int, **state) -> Path:
    return ckpt.save(step, save_model=write_model, state=state)


def test_save_is_atomic_and_complete(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=2)
    path = save(ckpt, 10, value=1)
    assert path == tmp_path / "checkpoints" / "step-00000010"
    assert (path / STATE_FILE).is_file() and (path / MODEL_DIR / "config.json").is_file()
    assert model_dir(path) == path / MODEL_DIR
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000010"]  # no .tmp-*


def test_latest_is_the_highest_step_and_keep_last_prunes(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=2)
    assert ckpt.latest() is None
    for step in (5, 20, 15):  # saved out of order: "latest" means the highest step, not the newest file
        save(ckpt, step)
    assert ckpt.latest() == tmp_path / "checkpoints" / "step-00000020"
    # 3 saved, keep 2: the lowest step (5) is gone
    assert sorted(p.name for p in ckpt.root.iterdir()) == ["step-00000015", "step-00000020"]
    save(ckpt, 100)
    assert ckpt.latest().name == "step-00000100"
    assert sorted(p.name for p in ckpt.root.iterdir()) == ["step-00000020", "step-00000100"]


def test_step_numbers_sort_numerically(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=5)
    save(ckpt, 9)
    save(ckpt, 123_456_789)  # 9 digits: "step-123456789" < "step-00000009" as text, not as a number
    assert ckpt.latest().name == "step-123456789"


def test_saving_a_step_again_replaces_it(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    save(ckpt, 10, value=1)
    save(ckpt, 10, value=2)
    assert ckpt.load_state(ckpt.latest())["value"] == 2


def test_crash_leftovers_are_ignored_and_cleaned(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=2)
    save(ckpt, 10)
    # a process killed while writing step 20: its staging dir holds a model but no state yet
    stale = ckpt.root / ".tmp-step-00000020-999999999"
    write_model(stale / MODEL_DIR)
    # and a step dir that never got its trainer_state.pt
    incomplete = ckpt.root / "step-00000030"
    write_model(incomplete / MODEL_DIR)
    assert ckpt.latest() == ckpt.root / "step-00000010"
    with pytest.raises(CheckpointError, match=r"trainer_state\.pt"):
        ckpt.load_state(incomplete)
    save(ckpt, 20)
    assert not stale.exists()
    assert ckpt.latest() == ckpt.root / "step-00000020"
    assert not any(p.name.startswith(".tmp-") for p in ckpt.root.iterdir())


def test_this_process_staging_dir_is_not_pruned(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    save(ckpt, 1)
    own = ckpt.root / f".tmp-step-00000099-{os.getpid()}"
    own.mkdir()
    save(ckpt, 2)
    assert own.exists()


def test_load_state_round_trip(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    generator = torch.Generator().manual_seed(7)
    state = {
        "optimizer": {"lr": 0.1, "m": torch.arange(4.0)},
        "data": {"epoch": 2, "cursor": 5},
        "rng": generator.get_state(),
        "history": [{"step": 1, "loss": 2.5}],
    }
    save(ckpt, 42, **state)
    loaded = ckpt.load_state(ckpt.latest())
    assert loaded["step"] == 42
    assert loaded["data"] == {"epoch": 2, "cursor": 5}
    assert loaded["history"] == [{"step": 1, "loss": 2.5}]
    assert torch.equal(loaded["optimizer"]["m"], torch.arange(4.0))
    restored = torch.Generator()
    restored.set_state(loaded["rng"])
    assert torch.equal(torch.rand(3, generator=restored), torch.rand(3, generator=generator))


def test_keep_last_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep_last"):
        Checkpointer(tmp_path, keep_last=0)
