"""Atomic, verified, resumable checkpoints.

A checkpoint is a directory `checkpoints/step-00000100/` holding:
    model/              a standard Hugging Face directory (safetensors + tokenizer; a LoRA run's adapter only)
    trainer_state.pt    optimiser, scheduler, RNG states of every generator, data position, counters,
                        metrics history, and whatever else the trainer hands over; tensors and plain Python
                        values only, loaded with `weights_only=True` (nothing is unpickled but those)
    manifest.json       the step, the trainer kind, the run's config, and the size and SHA-256 of every file
It is written under a temporary name in the same directory, flushed, and renamed into place: a crash at
any moment leaves either the previous checkpoints alone or the new one complete, never a half-written
one under a real name. Only the last `keep_last` are kept. A checkpoint whose files no longer match its
manifest (truncated, emptied, edited) is skipped for the newest intact one, and the run says so.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.errors import PosttrainError

_STEP_DIR = re.compile(r"^step-(\d+)$")
MODEL_DIR, STATE_FILE, MANIFEST_FILE = "model", "trainer_state.pt", "manifest.json"
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
"""OSErrors of the disk or its permissions, not of the program: a write that meets one says where and why."""


class CheckpointError(PosttrainError, RuntimeError):
    pass


@dataclass(frozen=True)
class Found:
    """The checkpoint a run resumes from, and the newer ones skipped because their files were damaged."""

    path: Path
    manifest: dict[str, Any]
    skipped: tuple[str, ...] = ()


class Checkpointer:
    def __init__(self, run_dir: str | Path, *, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def save(
        self,
        step: int,
        *,
        save_model: Callable[[Path], Any],
        state: dict[str, Any],
        about: dict[str, Any] | None = None,
        staging: Path | None = None,
    ) -> Path:
        """`save_model(directory)` writes the model; `state` (tensors and plain values) goes to trainer_state.pt;
        `about` (the trainer kind and config) into the manifest beside every file's size and hash. `staging`: a
        staging directory made by `collective_staging` and already holding what every rank wrote into it."""
        final = self.root / f"step-{step:08d}"
        written = staging is not None
        staging = staging or self.root / f".tmp-step-{step:08d}-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if staging.exists() and not written:
                shutil.rmtree(staging)
            staging.mkdir(exist_ok=written)
            save_model(staging / MODEL_DIR)
            torch.save({**state, "step": step}, staging / STATE_FILE)
            manifest = {"step": step, **(about or {}), "files": file_digests(staging)}
            (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
            fsync_tree(staging)
            if final.exists():  # the same step saved again (e.g. after a resume): replace it whole
                shutil.rmtree(final)
            os.rename(staging, final)
            fsync_dir(self.root)
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise disk_error(error, f"writing checkpoint step-{step:08d} to {self.root}") from error
        self._prune()
        return final

    def collective_staging(self, step: int, *, main: bool) -> Path:
        """The staging directory of a checkpoint every rank writes a part of (FSDP2's shards), the same path on each:
        the main rank makes it fresh; call a barrier before the others write."""
        staging = self.root / f".tmp-step-{step:08d}-ranks"
        if main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        return staging

    def latest(self) -> Path | None:
        """The newest checkpoint that is complete (its manifest and state written), or None."""
        steps = self._complete_steps()
        return steps[-1][1] if steps else None

    def latest_intact(self) -> Found | None:
        """The newest checkpoint whose files match its manifest (checked by size and SHA-256), with the newer ones
        skipped and why; None when there is none. Checkpoints of older posttrain versions (no manifest) pass."""
        skipped = []
        for _, path in reversed(self._complete_steps()):
            problem, manifest = verify(path)
            if problem is None:
                return Found(path, manifest, tuple(skipped))
            skipped.append(f"{path.name} ({problem})")
        if skipped:
            raise CheckpointError(f"--resume: every checkpoint in {self.root} is damaged: {'; '.join(skipped)}")
        return None

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
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a pickle of other objects, or damaged bytes
            raise CheckpointError(f"{path} cannot be loaded safely (weights_only): {error}") from error

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
            if not stale.name.endswith((f"-{os.getpid()}", "-ranks")):
                shutil.rmtree(stale, ignore_errors=True)


def file_digests(directory: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under `directory`, by path relative to it."""
    return {
        str(path.relative_to(directory)): {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(checkpoint: Path) -> tuple[str | None, dict[str, Any]]:
    """(what is wrong with a checkpoint's files, or None; its manifest, {} for a checkpoint without one)."""
    manifest_path = checkpoint / MANIFEST_FILE
    if not manifest_path.is_file():
        return None, {}
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST_FILE} is damaged", {}
    for name, expected in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing", manifest
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {expected['bytes']} were written", manifest
        if sha256_of(path) != expected["sha256"]:
            return f"{name} differs from what was written (SHA-256)", manifest
    return None, manifest


def disk_error(error: OSError, doing: str) -> Exception:
    """A one-line CheckpointError for a write the disk refused (full, read-only, no permission), naming the
    directory and its free space; other OSErrors pass through as they are."""
    if error.errno not in DISK_ERRORS:
        return error
    where = Path(error.filename) if error.filename else None
    free = ""
    for candidate in (where, *(where.parents if where else ())):
        if candidate is not None and candidate.exists():
            free = f"; {shutil.disk_usage(candidate).free / 2**20:.0f} MiB free there"
            break
    return CheckpointError(f"{doing}: {error.strerror} ({error.filename or 'the directory'}){free}")


def write_atomically(directory: str | Path, write: Callable[[Path], Any]) -> Path:
    """`write(staging)` fills a staging directory beside `directory`, which is then renamed into place (replacing
    what was there): a kill at any moment leaves the old directory or the new one, never half of one."""
    directory = Path(directory)
    staging = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)
        write(staging)
        fsync_tree(staging)
        if directory.exists():
            old = directory.with_name(f".old-{directory.name}-{os.getpid()}")
            os.rename(directory, old)
            os.rename(staging, directory)
            shutil.rmtree(old)
        else:
            os.rename(staging, directory)
        fsync_dir(directory.parent)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise disk_error(error, f"writing {directory}") from error
    return directory


def model_dir(checkpoint: str | Path) -> Path:
    return Path(checkpoint) / MODEL_DIR


def fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
