"""The trackers a run logs to besides metrics.jsonl, each in its offline or local-file mode (no network): what
the run logs reaches each one's own storage, read back with the tracker's own reader where it has one; a run
resumed continues the same tracker run; a tracker selected but not installed stops the run with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain.runtime import trackers
from posttrain.runtime.logging import RunLogger, read_samples
from posttrain.runtime.trackers import TrackerError, markdown_table, open_trackers, scalars

CONFIG = {"train": {"lr": 0.001, "max_steps": 2}, "output_dir": "runs/x"}
ROWS = [{"prompt": "1+1=", "completion": "2", "reward": 1.0}, {"prompt": "1+2=", "completion": "4", "reward": 0.0}]


class Recorder:
    """A tracker that keeps what it was given."""

    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.tables: list[tuple[str, int, list[dict]]] = []
        self.closed = False

    def log(self, metrics, step):
        self.logged.append((step, metrics))

    def log_table(self, name, rows, step):
        self.tables.append((name, step, rows))

    def close(self):
        self.closed = True


def test_the_logger_sends_finite_numbers_as_kind_slash_name_and_samples_as_a_table(tmp_path: Path) -> None:
    recorder = Recorder()
    log = RunLogger(tmp_path, total_steps=2, progress=False, trackers=[recorder])
    log.log(1, {"loss": 0.5, "tokens": 7, "grad_norm": float("nan")})
    log.log(2, {"accuracy": 0.25}, kind="eval")
    log.log_samples(1, ROWS)
    log.close()
    # the non-finite grad norm stays in metrics.jsonl (as "nan") and goes to no tracker
    assert recorder.logged == [(1, {"train/loss": 0.5, "train/tokens": 7.0}), (2, {"eval/accuracy": 0.25})]
    assert recorder.tables == [("samples", 1, [{"step": 1, **ROWS[0]}, {"step": 1, **ROWS[1]}])]
    assert read_samples(tmp_path) == [{"step": 1, **ROWS[0]}, {"step": 1, **ROWS[1]}]
    assert recorder.closed


def test_scalars_and_the_markdown_table():
    assert scalars({"a": 1, "b": True, "c": "x", "d": float("inf"), "e": 0.5}) == {"a": 1.0, "b": 1.0, "e": 0.5}
    assert markdown_table([{"p": "a|b", "r": 0.123456}, {"p": "c\nd"}]) == (
        "| p | r |\n|---|---|\n| a\\|b | 0.1235 |\n| c⏎d |  |"
    )


def test_a_selected_tracker_that_is_not_installed_stops_the_run_naming_the_extra(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(trackers, "installed", lambda name: False)
    expected = r"log.to: wandb is selected but not installed; pip install 'posttrain\[wandb\]'"
    with pytest.raises(TrackerError, match=expected):
        open_trackers(["wandb"], tmp_path, project="p", run_name="r", config=CONFIG)
    # the default TensorBoard is used only when installed
    assert open_trackers(["tensorboard"], tmp_path, project="p", run_name="r", config=CONFIG,
                         skip_missing=("tensorboard",)) == []  # fmt: skip


def test_tensorboard_gets_the_scalars_and_the_table_as_text(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    opened = open_trackers(["tensorboard"], tmp_path, project="p", run_name="r", config=CONFIG)
    log = RunLogger(tmp_path, total_steps=2, progress=False, trackers=opened)
    log.log(1, {"loss": 0.5})
    log.log(2, {"loss": 0.25})
    log.log_samples(2, ROWS)
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 0.5), (2, 0.25)]
    (text,) = events.Tensors("samples/text_summary")
    assert text.step == 2 and b"| 1+2= | 4 | 0 |" in text.tensor_proto.string_val[0]


def run_logged(tmp_path: Path, names: list[str], steps: range) -> None:
    log = RunLogger(tmp_path, total_steps=4, progress=False,
                    trackers=open_trackers(names, tmp_path, project="posttrain-test", run_name="run",
                                           config=CONFIG))  # fmt: skip
    for step in steps:
        log.log(step, {"loss": 1.0 / step})
    log.log_samples(steps[-1], ROWS)
    log.close()


def test_wandb_offline_writes_the_run_into_the_run_directory_and_a_resume_continues_it(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_logged(tmp_path, ["wandb"], range(1, 3))
    run_id = json.loads((tmp_path / "trackers.json").read_text())["wandb"]["id"]
    run_logged(tmp_path, ["wandb"], range(3, 5))  # a resume: the same id
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}*"))  # "-1" after a run of the same second
    assert len(runs) == 2, list((tmp_path / "wandb").iterdir())

    def records() -> bytes:
        return b"".join(p.read_bytes() for run in runs for p in run.glob(f"run-{run_id}.wandb"))

    # the run's records (a protobuf log W&B reads back with `wandb sync`) hold the metric and the config; W&B's
    # service process, which outlives run.finish() inside one Python process, may still be writing them
    deadline = time.monotonic() + 60
    while not all(x in records() for x in (b"train/loss", b"0.25", b"max_steps")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert b"train/loss" in records() and b"0.25" in records() and b"max_steps" in records()
    (table,) = {p.read_text() for run in runs for p in (run / "files" / "media" / "table").glob("samples_4_*.json")}
    assert json.loads(table) == {"columns": ["step", "prompt", "completion", "reward"],
                                 "data": [[4, "1+1=", "2", 1.0], [4, "1+2=", "4", 0.0]]}  # fmt: skip


def test_mlflow_file_store_gets_metrics_params_and_the_samples_table(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.18 keeps its file store for opt-in local use
    run_dir = tmp_path / "run"
    run_logged(run_dir, ["mlflow"], range(1, 3))
    run_logged(run_dir, ["mlflow"], range(3, 5))  # a resume continues the run
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]["run_id"]
    client = MlflowClient()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [
        (1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]  # fmt: skip
    run = client.get_run(run_id)
    assert run.data.params["train.lr"] == "0.001" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "posttrain-test"
    table = json.loads((Path(run.info.artifact_uri.removeprefix("file://")) / "samples.json").read_text())
    rows = [dict(zip(table["columns"], values)) for values in table["data"]]
    assert rows == [{"step": 2, **ROWS[0]}, {"step": 2, **ROWS[1]}, {"step": 4, **ROWS[0]}, {"step": 4, **ROWS[1]}]


TRACKIO_SCRIPT = """
import json, sys
from pathlib import Path
from posttrain.runtime.logging import RunLogger
from posttrain.runtime.trackers import open_trackers
run_dir = Path(sys.argv[1])
for steps in (range(1, 3), range(3, 5)):  # a run, then its resume
    log = RunLogger(run_dir, total_steps=4, progress=False, trackers=open_trackers(
        ["trackio"], run_dir, project="posttrain-test", run_name="run", config={"train": {"lr": 0.001}}))
    for step in steps:
        log.log(step, {"loss": 1.0 / step})
    log.log_samples(steps[-1], [{"prompt": "1+1=", "completion": "2", "reward": 1.0}])
    log.close()
from trackio.sqlite_storage import SQLiteStorage
found = {"runs": SQLiteStorage.get_runs("posttrain-test"), "logs": SQLiteStorage.get_logs("posttrain-test", "run")}
print("RESULT", json.dumps(found), flush=True)
"""


def test_trackio_local_gets_metrics_and_the_table_and_a_resume_continues_the_run(tmp_path: Path) -> None:
    pytest.importorskip("trackio")
    # trackio reads TRACKIO_DIR when imported: a process of its own
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", TRACKIO_SCRIPT, str(tmp_path / "run")], env=env, check=True,
                         capture_output=True, text=True, timeout=300).stdout  # fmt: skip
    found = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT ")).removeprefix("RESULT "))
    assert found["runs"] == ["run"]
    losses = [(r["step"], r["train/loss"]) for r in found["logs"] if "train/loss" in r]
    assert losses == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]
    tables = [(r["step"], r["samples"]["_value"]) for r in found["logs"] if "samples" in r]
    assert tables == [(s, [{"step": s, "prompt": "1+1=", "completion": "2", "reward": 1.0}]) for s in (2, 4)]


def test_a_resume_keeps_the_samples_of_the_steps_up_to_its_checkpoint(tmp_path: Path) -> None:
    from posttrain.runtime.logging import trim_samples

    (tmp_path / "samples.jsonl").write_text(
        "".join(json.dumps({"step": s, "completion": str(s)}) + "\n" for s in (1, 1, 3, 5)) + '{"step": 7, "comp'
    )  # a run killed while writing step 7's row
    trim_samples(tmp_path, step=3)
    assert read_samples(tmp_path) == [{"step": 1, "completion": "1"}, {"step": 1, "completion": "1"},
                                      {"step": 3, "completion": "3"}]  # fmt: skip
    log = RunLogger(tmp_path, total_steps=5, progress=False)
    log.log_samples(4, [{"completion": "4"}])
    log.close()
    assert [r["step"] for r in read_samples(tmp_path)] == [1, 1, 3, 4]
