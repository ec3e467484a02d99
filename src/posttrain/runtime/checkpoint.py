"""Atomic, resumable checkpoints.

A checkpoint is a directory `checkpoints/step-00000100/` holding:
    model/              a standard Hugging Face directory (safetensors + tokenizer), loadable on its own
    trainer_state.pt    optimiser, scheduler, RNG states of every generator, data position, counters,
                        metrics history, and whatever else the trainer hands over
It is written under a temporary name in the same directory, flushed, and renamed into place: a crash at
any moment leaves either the previous checkpoints alone or the new one complete, never a half-written
one under a real name. Only the last `keep_last` are kept.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

_STEP_DIR = re.compile(r"^step-(\d+)$")
MODEL_DIR, STATE_FILE = "model", "trainer_state.pt"


class CheckpointError(RuntimeError):
    pass


class Checkpointer:
    def __init__(self, run_dir: str | Path, *, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def save(self, step: int, *, save_model: Any, state: dict[str, Any]) -> Path:
        """`save_model(directory)` writes the model; `state` is pickled by torch.save."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step-{step:08d}"
        staging = self.root / f".tmp-step-{step:08d}-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        save_model(staging / MODEL_DIR)
        torch.save({**state, "step": step}, staging / STATE_FILE)
        _fsync_tree(staging)
        if final.exists():  # the same step saved again (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.rename(staging, final)
        _fsync_dir(self.root)
        self._prune()
        return final

    def latest(self) -> Path | None:
        steps = self._complete_steps()
        return steps[-1][1] if steps else None

    @staticmethod
    def step_of(checkpoint: str | Path) -> int:
        """The step a checkpoint directory (`step-00000012`) was written after."""
        match = _STEP_DIR.match(Path(checkpoint).name)
        if match is None:
            raise CheckpointError(f"{checkpoint}: not a checkpoint directory (step-NNNNNNNN)")
        return int(match.group(1))

    def load_state(self, checkpoint: str | Path) -> dict[str, Any]:
        path = Path(checkpoint) / STATE_FILE
        if not path.is_file():
            raise CheckpointError(f"{checkpoint} is not a complete checkpoint: {STATE_FILE} is missing")
        return torch.load(path, map_location="cpu", weights_only=False)

    def _complete_steps(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / STATE_FILE).is_file():
                found.append((int(match.group(1)), child))
        return sorted(found)

    def _prune(self) -> None:
        for _, path in self._complete_steps()[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)
        for stale in self.root.glob(".tmp-step-*"):  # left by a process killed mid-write
            if not stale.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(stale, ignore_errors=True)


def write_atomically(directory: str | Path, write: Any) -> Path:
    """`write(staging)` fills a staging directory beside `directory`, which is then renamed into place (replacing
    what was there): a kill at any moment leaves the old directory or the new one, never half of one."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    write(staging)
    _fsync_tree(staging)
    if directory.exists():
        old = directory.with_name(f".old-{directory.name}-{os.getpid()}")
        os.rename(directory, old)
        os.rename(staging, directory)
        shutil.rmtree(old)
    else:
        os.rename(staging, directory)
    _fsync_dir(directory.parent)
    return directory


def model_dir(checkpoint: str | Path) -> Path:
    return Path(checkpoint) / MODEL_DIR


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
