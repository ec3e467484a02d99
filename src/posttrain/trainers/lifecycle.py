"""The lifecycle every trainer's run goes through, in one place: start, resume, guard, log, save, finish.

    life = Lifecycle(cfg, kind="sft", resume=resume)     # environment, output_dir, seeds, device, the checkpoint
    model, tokenizer, _ = policy_and_reference(cfg.model, ..., life.checkpoint, ...)
    ...                                                    # data, optimiser, sampler: the trainer's own
    life.track(model, tokenizer, optim, sampler)           # what a checkpoint carries; restored when resuming
    life.open_log(report, headline=("loss",), progress=progress)  # metrics.jsonl, config.yaml, the trackers (log.to)
    with life.stop_requests():
        for step in life.steps():
            ...                                            # the loop: the part that differs between trainers
            life.log_samples(step + 1, lambda: rows)       # online trainers: sampled completions, on log.samples_every
            grad_norm = life.update(model, loss=loss, step=step + 1)
            life.end_step(step + 1, metrics)
    return life.finish(eval_metrics)                        # final evaluation line, checkpoint, final/, close

A loop is copied per trainer; this is not a base class and has no hooks: each method is one thing a loop calls.
Distributed training plugs in here once (rank-0 logging and saving, gradient reduction in `update`).

Resuming checks the checkpoint against the run (`manifest.json` holds the trainer kind and config): another
trainer's checkpoint, or a change that would silently alter the run (data, model, seed, batch, objective), is
refused with what differs; a change in `MAY_CHANGE` (more steps, another learning rate, evaluation settings) is
applied from the resumed step and said. A damaged newest checkpoint is skipped for the newest intact one, and
said. A run resumed at its last step only writes `final/` again from its checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from posttrain.config import ConfigError
from posttrain.data import EpochSampler
from posttrain.policies import describe_forward_path, is_lora, load_model, load_tokenizer, save_pretrained
from posttrain.policies.families import decoder_of
from posttrain.runtime.checkpoint import Checkpointer, CheckpointError, model_dir, write_atomically
from posttrain.runtime.device import limit_cpu_threads, rank_device, resolve_device
from posttrain.runtime.distributed import all_reduce_sum, any_rank, barrier, init_ranks, scale_gradients, sum_gradients
from posttrain.runtime.guards import NonFiniteGuard, is_sharded, step_schedule
from posttrain.runtime.logging import METRICS_FILE, RunLogger, phase, read_metrics, trim_samples
from posttrain.runtime.optim import lr_of_last_step
from posttrain.runtime.seeding import capture_rng_states, restore_rng_states, seed_everything
from posttrain.runtime.sharding import SHARDS_DIR, gathered_weights, load_shards, save_shards
from posttrain.runtime.signals import StopRequest, TrainingInterrupted
from posttrain.runtime.trackers import open_trackers
from posttrain.trainers.build import check_environment
from posttrain.trainers.splits import data_sources

MAY_CHANGE = (
    "train.max_steps", "train.epochs", "train.lr", "train.warmup_steps", "train.schedule", "train.min_lr_ratio",
    "train.weight_decay", "train.adam_betas", "train.max_grad_norm", "train.save_every", "train.eval_every",
    "train.log_every", "train.keep_last", "train.max_bad_steps", "train.micro_batch_size", "rl.micro_batch_size",
    "eval.", "log.", "device",
)  # fmt: skip
"""Config keys (or prefixes) a resumed run may change: applied from the resumed step, and said."""
CONFIG_FILE = "config.yaml"
"""The run's whole config, written when its log opens (`posttrain report` shows it)."""
MOVABLE = ("output_dir",)
"""Keys a resume does not compare: a run directory may be moved or copied whole."""


@dataclass
class RunResult:
    """What a training run returns: the trained model and tokenizer, `final/`, the metrics of every step, and the
    held-out evaluations before (`initial_eval`) and after (`final_eval`, `eval` for generation)."""

    model: Any
    tokenizer: Any
    final_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)
    eval: Any = None
    initial_eval: dict[str, float] = field(default_factory=dict)
    final_eval: dict[str, float] = field(default_factory=dict)
    reference_built: bool = False


class Lifecycle:
    """One run's start, resume, guard, log, save and finish (see the module docstring)."""

    def __init__(self, cfg: Any, *, kind: str, resume: bool) -> None:
        check_environment()
        self.cfg, self.kind, self.run_dir = cfg, kind, make_output_dir(cfg.output_dir, "output_dir")
        remove_stale_staging(self.run_dir)
        limit_cpu_threads()
        self.generator = seed_everything(cfg.seed)  # every rank: the same initial model and data order
        self.device = resolve_device(cfg.device)
        self.sharded = cfg.train.parallel == "fsdp"
        self.ranks = init_ranks(self.device.type, group=self.sharded)
        if self.ranks.distributed:
            self.device = rank_device(self.device, self.ranks)
            self.generator.manual_seed(cfg.seed + 1_000_003 * self.ranks.rank)  # each rank's own samples
        self.checkpointer = Checkpointer(self.run_dir, keep_last=cfg.train.keep_last)
        self.notes: list[str] = []
        self.before: dict[str, float] = {}
        self.checkpoint: Path | None = None
        self.start_step = 0
        self.recount = False
        if resume:
            self._find_checkpoint()
        self.history: list[dict[str, float]] = []
        self.log: RunLogger | None = None
        self.guard = NonFiniteGuard(cfg.train.max_bad_steps, self.checkpointer)
        self._stop = StopRequest()
        self._parts: dict[str, Any] = {}

    @property
    def complete(self) -> bool:
        """A resumed run whose checkpoint is at its last step: nothing is left to train."""
        return self.checkpoint is not None and self.start_step >= self.cfg.train.max_steps and not self.recount

    def _find_checkpoint(self) -> None:
        found = self.checkpointer.latest_intact()
        if found is None:
            return
        if found.skipped:
            self.notes.append(f"resume: skipped damaged checkpoints {', '.join(found.skipped)}; "
                              f"resuming from {found.path.name}")  # fmt: skip
        saved = found.manifest.get("config", {})
        planned = saved.get("train.max_steps")
        if self.cfg.train.epochs is not None and isinstance(planned, int):
            self.cfg = with_max_steps(self.cfg, planned)  # the checkpoint's, until `fit_epochs` counts the data
            self.recount = saved.get("train.epochs") != self.cfg.train.epochs  # other epochs: not complete yet
        self.notes += check_resume(self.cfg, self.kind, found.manifest, found.path)
        self.checkpoint, self.start_step = found.path, Checkpointer.step_of(found.path)

    def fit_epochs(self, examples: int, per_step: int, *, round_steps: int = 1) -> Any:
        """With train.epochs set, the run's train.max_steps from the data: ceil(epochs * examples / per_step) steps,
        or for online rounds of `per_step` prompts that many rounds of `round_steps` steps; said in the run's first
        lines. Returns the config the run goes on with (the same without train.epochs); call it before building the
        optimiser, whose schedule spans max_steps."""
        epochs = self.cfg.train.epochs
        if epochs is None:
            return self.cfg
        if examples < 1:
            raise ConfigError("train.epochs: the training data holds no example to make epochs of")
        steps = math.ceil(epochs * examples / per_step) * round_steps
        unit = f"rounds of {per_step} prompts x {round_steps} steps" if round_steps > 1 else f"{per_step} per step"
        planned = self.cfg.train.max_steps if self.checkpoint is not None else None
        if steps < self.start_step:
            raise ConfigError(f"train.epochs={epochs:g} makes {steps} steps of these {examples} examples, but the run "
                              f"resumes at step {self.start_step}; give more epochs or another output_dir")  # fmt: skip
        self.cfg = with_max_steps(self.cfg, steps)
        line = f"train.epochs={epochs:g}: {examples} examples, {unit} -> train.max_steps={steps}"
        if planned is not None and planned != steps:
            line += f" (the checkpoint's run planned {planned}: its data changed, or train.epochs did)"
        self.notes.append(line)
        return self.cfg

    def track(
        self,
        model: Any,
        tokenizer: Any,
        optim: Any,
        sampler: EpochSampler,
        *,
        extra_state: Callable[[], dict[str, Any]] | None = None,
        restore_extra: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """The parts a checkpoint carries besides the trainer's `extra_state()`; on a resume, restored from the
        checkpoint (the model's weights are the caller's: `build.policy_and_reference`), with the config's
        optimiser settings applied over the saved ones (`MAY_CHANGE`)."""
        self._parts = {"model": model, "tokenizer": tokenizer, "optim": optim, "sampler": sampler,
                       "extra_state": extra_state}  # fmt: skip
        if self.checkpoint is None:
            return
        state = self.checkpointer.load_state(self.checkpoint)
        if restore_extra is not None:
            restore_extra(state)
        if self.sharded:
            load_shards(model, optim.optimizer, self.checkpoint / SHARDS_DIR)
        else:
            optim.optimizer.load_state_dict(state["optimizer"])
        optim.scheduler.load_state_dict(state["scheduler"])
        apply_optimiser_settings(optim, self.cfg.train)
        sampler.load_state_dict(state["data"])
        restore_rng_states(state["rng"], {"sampling": self.generator})
        self.history = state["history"]
        self.guard = NonFiniteGuard(self.cfg.train.max_bad_steps, self.checkpointer, self.history)
        if self.ranks.main:
            rewrite_metrics(self.run_dir, self.history, step=self.start_step)
            trim_samples(self.run_dir, step=self.start_step)
        barrier(self.ranks)

    def open_log(
        self,
        report: Any,
        *,
        headline: tuple[str, ...],
        progress: bool,
        train_rows: Any = None,
        eval_rows: Any = None,
        lines: tuple[str, ...] = (),
    ) -> RunLogger:
        """The run's logger, and its first lines: what overrides replaced, where the rows come from and what
        loading kept, `lines` of the trainer's own (which forward runs), and what a resume found and applied. The run's
        config is written to RUN/config.yaml, and the trackers of `log.to` are opened (`runtime.trackers`)."""
        if not self.ranks.main:  # one rank logs, evaluates and writes the run's files
            self.log = SilentLog()
            return self.log
        cfg = self.cfg
        config = cfg.model_dump(mode="json")
        (self.run_dir / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        explicit = "to" in cfg.log.model_fields_set
        trackers = open_trackers(cfg.log.to, self.run_dir, project=cfg.log.project, config=config,
                                 run_name=cfg.log.run_name or self.run_dir.resolve().name,
                                 skip_missing=() if explicit else ("tensorboard",))  # fmt: skip
        self.log = RunLogger(self.run_dir, total_steps=cfg.train.max_steps, start_step=self.start_step,
                             headline=headline, progress=progress, trackers=trackers)  # fmt: skip
        if self.ranks.distributed:
            self.log.print(f"distributed: {self.ranks.world} ranks, data-parallel ({self.device.type})")
        model = self._parts.get("model")
        path = (describe_forward_path(model),) if model is not None and hasattr(model, "config") else ()
        for line in (*self.cfg.load_notes, data_sources(self.cfg.data, train_rows is not None, eval_rows is not None),
                     f"data: {report.summary()}", *path, *lines, *self.notes):  # fmt: skip
            self.log.print(line)
        if self.checkpoint is not None:
            self.log.print(f"resumed from {self.checkpoint} at step {self.start_step}")
        return self.log

    def log_samples(self, done: int, rows: Callable[[], list[dict[str, Any]]], *, steps: int = 1) -> None:
        """The sampled completions of the `steps` steps ending at `done` (an online round's), logged when they hold
        step 1 or a multiple of log.samples_every (0: never); `rows()` builds them (`rewards.inputs.sample_table`)
        only then."""
        every = self.cfg.log.samples_every
        if every and (done - steps == 0 or done // every > (done - steps) // every):
            self.log.log_samples(done, rows()[: self.cfg.log.samples_per_step])

    def steps(self) -> range:
        return range(self.start_step, self.cfg.train.max_steps)

    @contextmanager
    def stop_requests(self) -> Iterator[StopRequest]:
        """SIGINT / SIGTERM while the loop runs end it after its step, with a checkpoint (`end_step`). A loop that
        raises closes the run's log (its live progress display and files) on the way out."""
        with self._stop as stop:
            try:
                yield stop
            except BaseException:
                if self.log is not None:
                    self.log.close()
                raise

    def update(self, model: Any, *, loss: float | None, step: int) -> float:
        """Clip the gradients and step the optimiser, unless the loss or a gradient is non-finite (the guard skips
        the update and stops the run after train.max_bad_steps in a row); then step the schedule, which advances
        on a skipped update too. Returns the gradient norm before clipping."""
        optimizer = self._parts["optim"].optimizer
        sharded = [p for p in model.parameters() if is_sharded(p)]
        scale_gradients(sharded, self.ranks.world)  # FSDP2 averaged them over ranks; the losses want the sum
        sum_gradients([p for p in model.parameters() if not is_sharded(p)], self.ranks)
        norm = self.guard.step(model.parameters(), optimizer, self.cfg.train.max_grad_norm, loss=loss, step=step)
        self.step_schedule()
        return norm

    def step_schedule(self) -> None:
        """The learning-rate schedule's step, once per training step (a loop of several updates calls it itself)."""
        step_schedule(self._parts["optim"].scheduler)

    def guard_for(self, optimizer: Any | None) -> NonFiniteGuard | None:
        """A guard of its own for a second optimiser (the critic's), or None without one."""
        return None if optimizer is None else NonFiniteGuard(self.cfg.train.max_bad_steps, self.checkpointer)

    def step_metrics(self, step_time_s: float) -> dict[str, float]:
        """What every trainer logs of its step besides its loss (after the step's `update`)."""
        return {"lr": lr_of_last_step(self._parts["optim"].scheduler), "step_time_s": step_time_s,
                "skipped_steps": self.guard.skipped}  # fmt: skip

    def eval_due(self, done: int) -> bool:
        """Whether step `done` evaluates on `train.eval_every` (0: never); the final evaluation is `finish`'s."""
        train = self.cfg.train
        return bool(train.eval_every) and done % train.eval_every == 0 and done < train.max_steps

    def record(self, done: int, metrics: dict[str, float]) -> None:
        """Keep step `done`'s metrics in the history and log them on `train.log_every` and at the last step."""
        self.history.append({"step": done, **metrics})
        if done % self.cfg.train.log_every == 0 or done == self.cfg.train.max_steps:
            self.log.log(done, metrics)

    def end_step(self, done: int, metrics: dict[str, float]) -> None:
        """The end of every step: record it, save on `train.save_every`, and honour a stop request (SIGINT or
        SIGTERM) by saving this step and raising `TrainingInterrupted`."""
        self.record(done, metrics)
        self.end_span(done, 1)

    def end_span(self, done: int, steps: int) -> None:
        """The end of `steps` steps ending at `done` (an online round): save when a multiple of train.save_every
        fell within them, and honour a stop request."""
        every, last = self.cfg.train.save_every, self.cfg.train.max_steps
        crossed = bool(every) and done // every > (done - steps) // every
        saved = self.save(done) if crossed and done < last else None
        if any_rank(self._stop.requested, self.ranks):
            self.log.close()
            raise self.interrupted(done, saved or self.save(done))

    def evaluate_before(self, evaluate: Callable[[], dict[str, float]] | None, *, say: str | None = None) -> dict:
        """The held-out metrics before the first step (`evaluate()`), logged at step 0, so that `finish` can say what
        the run did to them; a resumed run reads the ones it logged then. {} without held-out rows (None)."""
        if evaluate is None:
            self.before = {}
        elif self.start_step == 0:
            with self.stop_requests():
                self.before = self.evaluate(evaluate)
            self.log_eval(0, self.before, say=say)
        else:
            logged = [r for r in read_metrics(self.run_dir) if r.get("kind") == "eval" and r.get("step") == 0]
            self.before = {k: v for r in logged for k, v in r.items() if k.startswith("eval_")}
        return self.before

    def evaluate(self, evaluate: Callable[[], dict[str, float]]) -> dict[str, float]:
        """`evaluate()` on the main rank, {} on the others (the model is the same on every rank); sharded (FSDP2),
        on every rank in step, each forward gathering the shards, and the main rank's result kept."""
        metrics = evaluate() if self.ranks.main or self.sharded else {}
        barrier(self.ranks)
        return metrics if self.ranks.main else {}

    def shard(self, model: Any) -> Any:
        """The model's decoder layers sharded over the ranks with FSDP2 (`train.parallel: fsdp`), the model itself
        otherwise. The embeddings, final norm and head stay whole on every rank (posttrain's log-probs read the head
        in vocabulary chunks, outside any module's forward) and their gradients are summed as ddp's are. Call it
        after the model is built and before its optimiser."""
        if not self.sharded:
            return model
        if is_lora(model):
            raise ConfigError("train.parallel: fsdp does not shard a LoRA model; use ddp (an adapter is small)")
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_of(model).layers:
            fully_shard(layer)
        return model

    def global_sum(self, value: Any) -> Any:
        """The sum of a count or tensor over the ranks (the global token count that divides every rank's loss)."""
        return all_reduce_sum(value, self.ranks)

    def share(self, items: list[Any]) -> list[Any]:
        """This rank's share of a step's global batch."""
        return self.ranks.share(items)

    def interrupted(self, done: int, checkpoint: Path) -> Exception:
        signal_number = self._stop.signal_number or signal.SIGTERM  # another rank got it
        return TrainingInterrupted(signal_number, done, checkpoint)

    def log_eval(self, step: int, metrics: dict[str, float], *, say: str | None = "eval") -> None:
        """An evaluation line in metrics.jsonl (kind "eval"), and on the console unless `say` is None."""
        if not metrics:
            return
        self.log.log(step, metrics, kind="eval")
        if say:
            self.log.print(f"{say}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def save(self, step: int) -> Path:
        """A checkpoint of the tracked parts at `step`, with the run's kind and config in its manifest."""
        parts = self._parts
        model, tokenizer, optim, sampler = parts["model"], parts["tokenizer"], parts["optim"], parts["sampler"]
        state = {
            "optimizer": SHARDS_DIR if self.sharded else optim.optimizer.state_dict(),
            "scheduler": optim.scheduler.state_dict(),
            "data": sampler.state_dict(),
            "rng": capture_rng_states({"sampling": self.generator}),
            "history": self.history,
            **(parts["extra_state"]() if parts["extra_state"] else {}),
        }
        about = {"kind": self.kind, "config": config_fingerprint(self.cfg), "world_size": self.ranks.world}
        path, staging, whole = self.checkpointer.root / f"step-{step:08d}", None, None
        if self.sharded:  # every rank writes its shards of the model and optimiser, then the main rank the rest
            staging = self.checkpointer.collective_staging(step, main=self.ranks.main)
            barrier(self.ranks)
            whole = save_shards(model, optim.optimizer, staging / SHARDS_DIR)
        if self.ranks.main:  # the model and optimiser are the same on every rank: one writes them
            with phase(f"checkpoint of step {step}"):
                path = self.checkpointer.save(step, save_model=lambda d: save_pretrained(model, tokenizer, d, whole),
                                              state=state, about=about, staging=staging)  # fmt: skip
        barrier(self.ranks)
        return path

    def finish(self, eval_metrics: dict[str, float] | None = None, *, say: str | None = "eval",
               **result: Any) -> RunResult:  # fmt: skip
        """The end of a run: its final evaluation line (on the console too unless `say` is None), the last
        checkpoint, `final/` (written whole or not at all), the logger closed. `result`: the RunResult fields the
        trainer adds (eval, initial_eval, ...)."""
        last = self.cfg.train.max_steps
        model, tokenizer = self._parts["model"], self._parts["tokenizer"]
        try:
            self.log_eval(last, eval_metrics or {}, say=say)
            for line in held_out_change(self.before, eval_metrics or {}):
                self.log.print(line)
            self.save(last)
            final_dir = self.run_dir / "final"
            whole = gathered_weights(model) if self.sharded else None
            if self.ranks.main:
                with phase("final/"):
                    write_final(self.run_dir, lambda d: save_pretrained(model, tokenizer, d, whole))
            barrier(self.ranks)
        finally:
            self.log.close()
        return RunResult(model, tokenizer, final_dir, self.history, final_eval=eval_metrics or {}, **result)

    def finished_result(self) -> RunResult:
        """A resumed run with nothing left to train: `final/` written again from the last checkpoint (a kill while
        it was written leaves none), and the run's model loaded from it."""
        source, final_dir = model_dir(self.checkpoint), self.run_dir / "final"
        if self.ranks.main:
            write_final(self.run_dir, lambda d: shutil.copytree(source, d))
        barrier(self.ranks)
        history = self.checkpointer.load_state(self.checkpoint)["history"]
        print(f"--resume: {self.checkpoint.name} is the run's last step (train.max_steps={self.cfg.train.max_steps});"
              f" final/ written again from it")  # fmt: skip
        return RunResult(load_model(final_dir, device=self.device), load_tokenizer(final_dir), final_dir, history)


def with_max_steps(cfg: Any, steps: int) -> Any:
    """The config with train.max_steps = steps (train.epochs resolved; pydantic's copy, not validated again)."""
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": steps})})


PROPORTIONS = {"eval_accuracy": "eval_examples", "eval_pref_accuracy": "eval_pairs", "eval_pass@": "eval_examples"}
"""Held-out metrics that are shares of examples (by prefix), and the metric counting those examples: their
before/after change is weighed against their noise."""


def held_out_change(before: dict[str, float], after: dict[str, float]) -> list[str]:
    """What a run did to each held-out share it measured before and after, against the noise of one evaluation
    over its n examples (two binomial standard errors of the difference, sqrt(p0 (1 - p0) / n + p1 (1 - p1) / n));
    a drop larger than that is a warning: the run made the model worse on its held-out rows."""
    lines = []
    for key in (k for k in after if k.startswith(tuple(PROPORTIONS)) and k in before):
        count = next(c for prefix, c in PROPORTIONS.items() if key.startswith(prefix))
        n, p0, p1 = after.get(count) or before.get(count), before[key], after[key]
        if not n or not (0 <= p0 <= 1 and 0 <= p1 <= 1):
            continue
        noise = 2 * math.sqrt(p0 * (1 - p0) / n + p1 * (1 - p1) / n)
        change = f"{key} {p0:.4f} -> {p1:.4f} ({100 * (p1 - p0):+.1f} points; noise ±{100 * noise:.1f} over {n:.0f})"
        lines.append(f"held-out change: {change}")
        if p0 - p1 > noise:
            lines.append(f"WARNING: held-out {key} fell by {100 * (p0 - p1):.1f} points, more than one evaluation of "
                         f"{n:.0f} examples varies by: this run made the model worse on its held-out rows")  # fmt: skip
    return lines


class SilentLog:
    """The logger of a rank that is not the main one: it logs nothing (the main rank writes metrics.jsonl)."""

    def log(self, step: int, metrics: dict[str, float], *, kind: str = "train") -> None:
        pass

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        pass

    def print(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass


def write_final(run_dir: Path, write: Callable[[Path], Any]) -> Path:
    return write_atomically(run_dir / "final", write)


def make_output_dir(path: str | Path, key: str) -> Path:
    """Create the directory a run or command writes to and check it can be written, or raise ConfigError naming
    `key` (an existing file on the path, a read-only file system, no permission)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".posttrain-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"{key}: {path} is a file, or lies under one; give a directory") from None
    except OSError as error:
        raise ConfigError(f"{key}: cannot write to {path} ({error.strerror})") from None
    return path


def remove_stale_staging(run_dir: Path) -> None:
    """Staging directories a process killed while writing `final/` (or an export) left behind."""
    for stale in (*run_dir.glob(".tmp-final-*"), *run_dir.glob(".old-final-*")):
        shutil.rmtree(stale, ignore_errors=True)


def config_fingerprint(cfg: Any) -> dict[str, Any]:
    """The run's config as its checkpoints record it: every key, flat and dotted, as JSON values."""
    return dict(flatten(cfg.model_dump(mode="json")))


def flatten(raw: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in raw.items():
        if isinstance(value, dict) and value:
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def check_resume(cfg: Any, kind: str, manifest: dict[str, Any], checkpoint: Path) -> list[str]:
    """Notes of what a resume changes (keys in MAY_CHANGE); CheckpointError naming every other difference, and a
    checkpoint of another trainer. A checkpoint without a manifest (older posttrain) resumes unchecked, said."""
    if not manifest:
        return [f"resume: {checkpoint.name} has no manifest (an older posttrain wrote it); its config is not checked"]
    if manifest.get("kind") != kind:
        raise CheckpointError(f"--resume: {checkpoint} was written by `posttrain {manifest.get('kind')}`, not "
                              f"`posttrain {kind}`; give this run another output_dir")  # fmt: skip
    saved, now = manifest.get("config", {}), config_fingerprint(cfg)
    changed = sorted(key for key in saved.keys() | now.keys() if saved.get(key) != now.get(key) and key not in MOVABLE)
    refused = [key for key in changed if not key.startswith(MAY_CHANGE)]
    if refused:
        shown = "; ".join(f"{key}: {saved.get(key)!r} -> {now.get(key)!r}" for key in refused)
        raise CheckpointError(
            f"--resume: the run's config differs from {checkpoint.name}'s in what a resume cannot change ({shown}); "
            "set them back, or start a new run in another output_dir"
        )
    step = Checkpointer.step_of(checkpoint)
    return [f"resume: {key} {saved.get(key)!r} -> {now.get(key)!r}, applied from step {step}" for key in changed]


def apply_optimiser_settings(optim: Any, train: Any) -> None:
    """The config's lr, weight decay and betas over the ones a loaded optimiser state brought back (the schedule's
    shape already follows the config: its function is built from it)."""
    optim.scheduler.base_lrs = [train.lr for _ in optim.scheduler.base_lrs]
    for group in optim.optimizer.param_groups:
        group["initial_lr"], group["betas"] = train.lr, tuple(train.adam_betas)
        if group["weight_decay"]:  # the decayed group (biases and norms keep 0)
            group["weight_decay"] = train.weight_decay
    multiplier = optim.scheduler.lr_lambdas[0](optim.scheduler.last_epoch)
    for group in optim.optimizer.param_groups:  # the next update's rate, as the schedule's step would set it
        group["lr"] = train.lr * multiplier


def rewrite_metrics(run_dir: Path, history: list[dict[str, float]], *, step: int) -> None:
    """After a resume from the checkpoint of `step`, metrics.jsonl holds exactly the checkpoint's history and the
    evaluation lines the file had up to that step, each after its step's train line (later lines were lost work).
    Evaluations are not in the history: the initial one and those of online rounds are logged only."""
    records = [(h["step"], 0, {"kind": "train", **h}) for h in history]
    for record in read_metrics(run_dir):
        at = record.get("step")
        if record.get("kind") != "train" and isinstance(at, int) and at <= step:
            records.append((at, 1, record))
    records.sort(key=lambda r: r[:2])
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(record) + "\n" for _, _, record in records))


def sampling_generator(seed: int) -> torch.Generator:
    """A generator of its own for held-out evaluation, so that evaluating never shifts training's draws."""
    return torch.Generator().manual_seed(seed + 1)
