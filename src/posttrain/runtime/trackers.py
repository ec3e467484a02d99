"""Experiment trackers a run also logs to, besides the metrics.jsonl it always writes (`log.to` in a recipe):
TensorBoard, Weights & Biases, MLflow and trackio. Each is imported only when a run selects it; posttrain sends
nothing anywhere of its own.

    log:
      to: [tensorboard, wandb]   # any of tensorboard, wandb, mlflow, trackio
      project: my-project        # wandb / trackio project, MLflow experiment

Where each writes, and how its offline or local mode is chosen (the tracker's own settings, as its users know them):

| tracker     | where                                               | offline / local                                 |
|-------------|-----------------------------------------------------|-------------------------------------------------|
| tensorboard | RUN/tensorboard/                                    | always local                                    |
| wandb       | RUN/wandb/ (or $WANDB_DIR), then the W&B server     | WANDB_MODE=offline (`wandb sync` uploads later) |
| mlflow      | $MLFLOW_TRACKING_URI (MLflow's default: ./mlruns)   | a file: or sqlite: URI                          |
| trackio     | $TRACKIO_DIR (default ~/.cache/huggingface/trackio) | local unless a Space or server is configured    |

A resumed run continues the same tracker run: its identity (wandb id, MLflow run id, trackio name) is kept in
RUN/trackers.json. Metric names are `kind/name` (`train/loss`, `eval/eval_accuracy`); the sampled completions of
online trainers go to each tracker's table API (`log_table`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from posttrain.errors import PosttrainError

TRACKER_NAMES = ("tensorboard", "wandb", "mlflow", "trackio")
IDENTITY_FILE = "trackers.json"
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
"""The module each tracker imports; `pip install posttrain[<name>]` installs it."""


class TrackerError(PosttrainError, RuntimeError):
    """A tracker that is selected but not installed, or that could not start its run."""


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None: ...

    def close(self) -> None: ...


def installed(name: str) -> bool:
    return importlib.util.find_spec(PACKAGES[name]) is not None


def open_trackers(
    names: Sequence[str],
    run_dir: Path,
    *,
    project: str,
    run_name: str,
    config: dict[str, Any],
    skip_missing: Sequence[str] = (),
) -> list[Tracker]:
    """Open each named tracker for the run in `run_dir` (continuing the run recorded in RUN/trackers.json). A tracker
    that is not installed raises TrackerError naming the extra to install, unless it is in `skip_missing` (the
    default TensorBoard, used only when installed)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    identity = read_identity(run_dir)
    opened: list[Tracker] = []
    try:
        for name in dict.fromkeys(names):
            if not installed(name):
                if name in skip_missing:
                    continue
                raise TrackerError(f"log.to: {name} is selected but not installed; pip install 'posttrain[{name}]' "
                                   f"(or {PACKAGES[name]}), or drop it from log.to")  # fmt: skip
            try:
                tracker = OPENERS[name](run_dir, project=project, run_name=run_name, config=config,
                                        identity=identity.get(name))  # fmt: skip
            except TrackerError:
                raise
            except Exception as error:  # the tracker's own failure (a bad URI, a login it needs): one line
                reason = f"{type(error).__name__}: {error}"
                raise TrackerError(f"log.to: {name} could not start its run: {reason}") from error
            opened.append(tracker)
            identity[name] = getattr(tracker, "identity", {})
    except BaseException:
        for tracker in opened:
            tracker.close()
        raise
    write_identity(run_dir, identity)
    return opened


def read_identity(run_dir: Path) -> dict[str, dict[str, Any]]:
    path = run_dir / IDENTITY_FILE
    if not path.is_file():
        return {}
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def write_identity(run_dir: Path, identity: dict[str, dict[str, Any]]) -> None:
    (run_dir / IDENTITY_FILE).write_text(json.dumps(identity, indent=2) + "\n", encoding="utf-8")


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics record (a tracker's scalar API takes nothing else)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, int | float) and math.isfinite(value):
            out[key] = float(value)
    return out


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every key of the rows, in first-seen order."""
    return list(dict.fromkeys(key for row in rows for key in row))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a Markdown table (TensorBoard's text plugin renders it), cells on one line each."""
    columns = table_columns(rows)

    def cell(value: Any) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str("" if value is None else value)
        return text.replace("|", "\\|").replace("\n", "⏎")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# --- the trackers ----------------------------------------------------------------------------------------------


class TensorBoardTracker:
    def __init__(self, run_dir: Path, *, config: dict[str, Any], **_: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        self.writer.add_text(name, markdown_table(rows), step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run in RUN/wandb/ (unless WANDB_DIR says where), resumed by its id; console capture off (the run's
    progress display would fill it)."""

    def __init__(self, run_dir: Path, *, project: str, run_name: str, config: dict[str, Any],
                 identity: dict[str, Any] | None) -> None:  # fmt: skip
        import os

        import wandb

        self.wandb = wandb
        run_id = (identity or {}).get("id") or secrets.token_hex(4)
        directory = None if os.environ.get("WANDB_DIR") else str(run_dir)
        self.run = wandb.init(project=project, name=run_name, id=run_id, resume="allow", dir=directory,
                              config=config, settings=wandb.Settings(console="off"))  # fmt: skip
        self.identity = {"id": run_id}

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        columns = table_columns(rows)
        table = self.wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        self.run.log({name: table}, step=step)

    def close(self) -> None:
        self.run.finish()


MLFLOW_NAME = re.compile(r"[^\w\-. /:]")
"""What MLflow refuses in a metric name (it allows letters, digits, _ - . space / :)."""
MLFLOW_BATCH = 100
"""Params per log_batch call (MLflow's limit)."""


class MlflowTracker:
    """An MLflow run in experiment `project`, on MLFLOW_TRACKING_URI (MLflow's own default otherwise), resumed by its
    run id. Params are the flat config, written once, when the run is created (MLflow refuses changed params)."""

    def __init__(self, run_dir: Path, *, project: str, run_name: str, config: dict[str, Any],
                 identity: dict[str, Any] | None) -> None:  # fmt: skip
        import os

        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # log_table reads the table back
        self.client = MlflowClient()
        run_id = (identity or {}).get("run_id")
        if run_id is None or not self._exists(run_id):
            experiment = self.client.get_experiment_by_name(project)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
            run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            params = [Param(key, json.dumps(value)[:6000]) for key, value in flat(config)]
            for start in range(0, len(params), MLFLOW_BATCH):
                self.client.log_batch(run_id, params=params[start : start + MLFLOW_BATCH])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        self.identity = {"run_id": run_id, "tracking_uri": self.client.tracking_uri}

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
        except Exception:  # MLflow raises its own exception for an unknown id
            return False
        return True

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(MLFLOW_NAME.sub("_", key), value, now, step) for key, value in metrics.items()]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        columns = table_columns(rows)
        data = {c: [row.get(c) for row in rows] for c in columns}
        self.client.log_table(self.run_id, data=data, artifact_file=f"{name}.json")  # appends to the run's table

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class TrackioTracker:
    """A trackio run in project `project`, resumed by its name; trackio's own CPU/GPU sampling threads stay off."""

    def __init__(self, run_dir: Path, *, project: str, run_name: str, config: dict[str, Any],
                 identity: dict[str, Any] | None) -> None:  # fmt: skip
        import trackio

        self.trackio = trackio
        saved = (identity or {}).get("name")
        name = saved or run_name  # a new run is a new trackio run even where the name is taken; a resumed one continues
        self.run = trackio.init(project=project, name=name, config=config, resume="allow" if saved else "never",
                                embed=False, auto_log_gpu=False, auto_log_cpu=False)  # fmt: skip
        self.identity = {"name": name}

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        columns = table_columns(rows)
        table = self.trackio.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        self.run.log({name: table}, step=step)

    def close(self) -> None:
        self.run.finish()


OPENERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker,
           "trackio": TrackioTracker}  # fmt: skip


def flat(raw: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """A nested config as (dotted key, value) pairs."""
    out = []
    for key, value in raw.items():
        if isinstance(value, dict) and value:
            out += flat(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out
