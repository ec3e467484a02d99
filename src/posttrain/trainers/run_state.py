"""What every trainer does at the end of a step: clip and step the optimiser (skipping non-finite
updates), save and restore run state."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from posttrain.config import ConfigError
from posttrain.policies import save_pretrained
from posttrain.runtime.checkpoint import Checkpointer, CheckpointError
from posttrain.runtime.device import limit_cpu_threads, resolve_device
from posttrain.runtime.guards import NonFiniteGuard, step_schedule
from posttrain.runtime.logging import METRICS_FILE, phase, read_metrics
from posttrain.runtime.optim import lr_of_last_step
from posttrain.runtime.seeding import capture_rng_states, restore_rng_states, seed_everything
from posttrain.trainers.build import EpochSampler, check_environment


def start_run(cfg: Any, resume: bool) -> tuple[torch.Generator, torch.device, Checkpointer, Path | None]:
    """What every trainer does first: check the environment variables it reads (`check_environment`), keep
    torch's threads within the cores, seed every generator, pick the device, and find the checkpoint to resume
    from (None unless `resume`).
    Returns (the sampling generator, device, checkpointer of cfg.output_dir, checkpoint or None)."""
    check_environment()
    make_output_dir(cfg.output_dir, "output_dir")
    limit_cpu_threads()
    generator = seed_everything(cfg.seed)
    checkpointer = Checkpointer(Path(cfg.output_dir), keep_last=cfg.train.keep_last)
    checkpoint = checkpointer.latest() if resume else None
    reached = Checkpointer.step_of(checkpoint) if checkpoint is not None else 0
    if reached >= cfg.train.max_steps:
        raise CheckpointError(
            f"--resume: the newest checkpoint, {checkpoint}, is at step {reached} and "
            f"train.max_steps is {cfg.train.max_steps}, so there is nothing left to train; raise train.max_steps"
        )
    return generator, resolve_device(cfg.device), checkpointer, checkpoint


def print_start(
    log: Any,
    cfg: Any,
    report: Any,
    *,
    checkpoint: Path | None,
    start_step: int,
    train_rows: Any = None,
    eval_rows: Any = None,
) -> None:
    """The run's first lines: what overrides replaced in the recipe, where training and held-out rows come from,
    what loading them kept and dropped, and where a resumed run starts."""
    for note in cfg.load_notes:
        log.print(note)
    log.print(data_sources(cfg.data, train_rows is not None, eval_rows is not None))
    log.print(f"data: {report.summary()}")
    if checkpoint is not None:
        log.print(f"resumed from {checkpoint} at step {start_step}")


def data_sources(data: Any, train_rows: bool, eval_rows: bool) -> str:
    """Where a run's rows come from, in the order the loaders look (rows passed from Python, data.train or
    data.eval, data.task): a task beside a training file gives the held-out rows only, which this says."""
    task = f"data.task ({data.task.name}, generated)" if data.task is not None else None
    train = "rows passed from Python" if train_rows else data.train or task
    held_out = "rows passed from Python" if eval_rows else data.eval or task
    line = f"data: training rows from {train or 'nowhere'}; held-out rows from {held_out or 'none'}"
    if task is not None and held_out == task and train != task:
        line += " (data.eval is not set)"
    return line


def make_output_dir(path: str | Path, key: str) -> Path:
    """Create the directory a run or command writes to, or raise ConfigError naming `key` where it cannot be (an
    existing file on the path, no permission)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"{key}: {path} is a file, or lies under one; give a directory") from None
    except PermissionError as error:
        raise ConfigError(f"{key}: cannot create {path} ({error.strerror})") from None
    return path


def clip_and_step(
    model: Any, optim: Any, max_grad_norm: float | None, guard: NonFiniteGuard, *, loss: float, step: int
) -> float:
    """Clip, step the optimiser unless the loss or a gradient is non-finite (`guard`), step the schedule.
    The schedule advances on a skipped update too, so the learning rate stays a function of the step."""
    norm = guard.step(model.parameters(), optim.optimizer, max_grad_norm, loss=loss, step=step)
    step_schedule(optim.scheduler)
    return norm


def step_metrics(optim: Any, guard: NonFiniteGuard, step_time_s: float) -> dict[str, float]:
    """What every trainer logs of its step besides its loss: the learning rate its updates used, wall time,
    skipped steps so far. Call it after the step's schedule step."""
    return {"lr": lr_of_last_step(optim.scheduler), "step_time_s": step_time_s, "skipped_steps": guard.skipped}


def eval_due(train: Any, done: int) -> bool:
    """Whether step `done` evaluates on `train.eval_every` (0: never); the final evaluation is the caller's."""
    return bool(train.eval_every) and done % train.eval_every == 0 and done < train.max_steps


def finish_step(
    done: int,
    metrics: dict[str, float],
    history: list[dict[str, float]],
    log: Any,
    train: Any,
    stop: Any,
    save: Callable[[int], Path],
) -> None:
    """The end of every step: record and log its metrics, save on `train.save_every`, and honour a stop
    request (SIGINT/SIGTERM) by saving this step and raising `TrainingInterrupted`. `save(step)` writes
    the trainer's checkpoint and returns its path; the final save after the last step is the caller's."""
    history.append({"step": done, **metrics})
    if done % train.log_every == 0 or done == train.max_steps:
        log.log(done, metrics)
    saved = save(done) if train.save_every and done % train.save_every == 0 and done < train.max_steps else None
    if stop.requested:
        log.close()
        raise stop.interrupted(done, saved or save(done))


def save_checkpoint(
    checkpointer: Checkpointer,
    step: int,
    model: Any,
    tokenizer: Any,
    optim: Any,
    sampler: EpochSampler,
    generator: torch.Generator,
    history: list[dict[str, float]],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the model and the training state every trainer has, plus the trainer's own `extra` state."""
    state = {
        "optimizer": optim.optimizer.state_dict(),
        "scheduler": optim.scheduler.state_dict(),
        "data": sampler.state_dict(),
        "rng": capture_rng_states({"sampling": generator}),
        "history": history,
        **(extra or {}),
    }
    with phase(f"checkpoint of step {step}"):
        return checkpointer.save(step, save_model=lambda d: save_pretrained(model, tokenizer, d), state=state)


def restore_checkpoint(
    checkpointer: Checkpointer,
    checkpoint: Path | None,
    optim: Any,
    sampler: EpochSampler,
    generator: torch.Generator,
    restore_extra: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[list[dict[str, float]], int]:
    """Load what `save_checkpoint` wrote (the model is the caller's), hand the whole state to `restore_extra`
    for the trainer's own, and return (history, start step); ([], 0) without a checkpoint. metrics.jsonl is
    rewritten to the checkpoint's history and the evaluations logged up to its step (`rewrite_metrics`)."""
    if checkpoint is None:
        return [], 0
    state = checkpointer.load_state(checkpoint)
    if restore_extra is not None:
        restore_extra(state)
    optim.optimizer.load_state_dict(state["optimizer"])
    optim.scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["data"])
    restore_rng_states(state["rng"], {"sampling": generator})
    rewrite_metrics(checkpointer.root.parent, state["history"], step=state["step"])
    return state["history"], state["step"]


def rewrite_metrics(run_dir: Path, history: list[dict[str, float]], *, step: int) -> None:
    """After a resume from the checkpoint of `step`, metrics.jsonl holds exactly the checkpoint's history and the
    evaluation lines the file had up to that step, each after its step's train line (later lines were lost work).
    Evaluations are not in the history: the initial one and those of online rounds are logged only. (A run is never
    resumed at or past its last step, `start_run`, so its final evaluation is always made again.)"""
    records = [(h["step"], 0, {"kind": "train", **h}) for h in history]
    for record in read_metrics(run_dir):
        at = record.get("step")
        if record.get("kind") != "train" and isinstance(at, int) and at <= step:
            records.append((at, 1, record))
    records.sort(key=lambda r: r[:2])
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(record) + "\n" for _, _, record in records))
