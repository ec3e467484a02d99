"""Run logging: a rich progress bar, metrics as JSONL in the run directory (and sampled completions as
samples.jsonl), the experiment trackers a run selects (`runtime.trackers`), and `track` / `phase` for the long
steps outside the training loop (reference log-probs, evaluation, saving)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.errors import LiveError
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from posttrain.runtime.trackers import Tracker, scalars

console = Console(stderr=True)

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"

T = TypeVar("T")

# The open RunLogger's display: its Progress, False when it was opened with progress=False, None when no run logs.
_run_display: ContextVar[Progress | bool | None] = ContextVar("run_display", default=None)


class RunLogger:
    """Writes one JSON object per logged step to `run_dir/metrics.jsonl` (and to the open `trackers`, as
    `kind/name`), sampled completions to `run_dir/samples.jsonl` (and the trackers' tables), and shows progress.
    Closing it closes the trackers."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        total_steps: int,
        start_step: int = 0,
        headline: tuple[str, ...] = ("loss",),
        progress: bool = True,
        trackers: Sequence[Tracker] = (),
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.headline = headline
        path = self.run_dir / METRICS_FILE
        torn = _ends_mid_line(path)
        self._metrics = open(path, "a", encoding="utf-8")  # noqa: SIM115
        if torn:  # a run killed mid-line: the next record starts a line of its own
            self._metrics.write("\n")
        self._trackers = list(trackers)
        self._progress = _make_progress() if progress else None
        self._task = None
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, stats="")
        self._display = _run_display.set(self._progress if progress else False)

    def log(self, step: int, metrics: dict[str, float], *, kind: str = "train") -> None:
        values = {k: _plain(v) for k, v in metrics.items()}
        self._metrics.write(json.dumps({"step": step, "kind": kind, "time": time.time(), **values}) + "\n")
        self._metrics.flush()
        numbers = {f"{kind}/{key}": value for key, value in scalars(values).items()}
        for tracker in self._trackers:
            tracker.log(numbers, step)
        if self._progress is not None and kind == "train":
            stats = "  ".join(f"{k} {_short(metrics[k])}" for k in self.headline if k in metrics)
            self._progress.update(self._task, completed=step, stats=stats)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Sampled completions of `step` (one dict per completion) as lines of samples.jsonl and a tracker table."""
        if not rows:
            return
        path = self.run_dir / SAMPLES_FILE
        torn = _ends_mid_line(path)
        with path.open("a", encoding="utf-8") as handle:
            handle.write("\n" if torn else "")
            for row in rows:
                handle.write(json.dumps({"step": step, **{k: _plain(v) for k, v in row.items()}}, default=str) + "\n")
        for tracker in self._trackers:
            tracker.log_table("samples", [{"step": step, **row} for row in rows], step)

    def print(self, message: str) -> None:
        (self._progress.console if self._progress is not None else console).print(message)

    def close(self) -> None:
        if self._display is not None:
            _run_display.reset(self._display)
            self._display = None
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        trackers, self._trackers = self._trackers, []
        for tracker in trackers:
            tracker.close()
        self._metrics.close()


def track(
    items: Iterable[T], description: str, *, total: int | None = None, unit: str = "", enabled: bool = True
) -> Iterator[T]:
    """Yield `items` under a progress bar (`description`, done/total, elapsed, eta), then print one line:
    "description: 40 batches in 12.3 s". While a RunLogger is open the bar is a row of its display, and silent
    when that run has progress=False; otherwise a bar of its own. enabled=False yields the items silently (the
    trainers pass their `progress` flag for the steps before their RunLogger opens)."""
    total = len(items) if total is None and hasattr(items, "__len__") else total  # type: ignore[arg-type]
    if not _shown(enabled) or total == 0:  # nothing to wait for
        yield from items
        return
    count, started = 0, time.perf_counter()
    with _row(description, total) as advance:
        for item in items:
            yield item
            count += 1
            advance(count)
    _say(f"{description}: {count}{f' {unit}' if unit else ''} in {time.perf_counter() - started:.1f} s")


@contextmanager
def phase(description: str, *, enabled: bool = True) -> Iterator[None]:
    """A long step without a count (saving a model): a row while it runs, then one line "description: 1.2 s".
    Silent under the same conditions as `track`; nothing is printed when the step raises."""
    if not _shown(enabled):
        yield
        return
    started = time.perf_counter()
    with _row(description, None):
        yield
    _say(f"{description}: {time.perf_counter() - started:.1f} s")


def _shown(enabled: bool) -> bool:
    return enabled and _run_display.get() is not False


@contextmanager
def _row(description: str, total: int | None) -> Iterator[Any]:
    """A progress row for the duration of the block, on the open run's display or on a transient one of its own;
    yields `advance(completed)`. No row of its own off a terminal, or where another live display holds the
    terminal (rich < 14 nests none)."""
    display = _run_display.get()
    bar = display if isinstance(display, Progress) else _make_progress(transient=True)
    if bar is not display and not _start(bar):
        yield lambda completed: None
        return
    task = bar.add_task(description, total=total, stats="")
    try:
        yield lambda completed: bar.update(task, completed=completed)
    finally:
        if bar is display:
            bar.remove_task(task)
        else:
            bar.stop()


def _start(bar: Progress) -> bool:
    if not console.is_terminal:  # a log file gets the closing line only
        return False
    try:
        bar.start()
    except LiveError:
        return False
    return True


def _say(message: str) -> None:
    display = _run_display.get()
    (display.console if isinstance(display, Progress) else console).print(message, markup=False, highlight=False)


def _ends_mid_line(path: Path) -> bool:
    """Whether the file exists, is not empty and its last byte is not a newline (read alone: the file grows long)."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with path.open("rb") as handle:
        handle.seek(-1, 2)
        return handle.read(1) != b"\n"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, in order; a line that does not parse (cut short when a run was
    killed while writing it) is left out."""
    return read_jsonl(Path(run_dir) / METRICS_FILE)


def read_samples(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's samples.jsonl (sampled completions), in order, torn lines left out."""
    return read_jsonl(Path(run_dir) / SAMPLES_FILE)


def trim_samples(run_dir: str | Path, *, step: int) -> None:
    """After a resume from the checkpoint of `step`, samples.jsonl keeps the rows of steps up to it (later rows were
    of lost work, and are sampled again)."""
    path = Path(run_dir) / SAMPLES_FILE
    if path.is_file():
        kept = [row for row in read_samples(run_dir) if isinstance(row.get("step"), int) and row["step"] <= step]
        path.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _make_progress(*, transient: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _short(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"
