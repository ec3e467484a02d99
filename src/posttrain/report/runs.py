"""A run directory as `posttrain report` and `posttrain compare` read it: every logged metric as a series over steps,
the sampled completions, and the config.

    run = load_run("runs/arith-grpo")
    steps, values = run.series[("train", "loss")]
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from posttrain.runtime.logging import read_metrics, read_samples

NOT_METRICS = ("step", "kind", "time")
CONFIG_FILE = "config.yaml"


@dataclass
class RunData:
    """One run's logged series, `(kind, metric) -> (steps, values)` in logged order, its samples and config."""

    label: str
    path: Path
    series: dict[tuple[str, str], tuple[list[int], list[float]]]
    samples: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    """Wall time from the start of the first logged step (its record's time less its step_time_s) to the last record:
    the time in training steps, evaluations between them included."""

    @property
    def steps(self) -> int:
        return max((max(s) for s, _ in self.series.values() if s), default=0)

    @property
    def trainer(self) -> str:
        """The trainer that wrote the run, from its config's sections."""
        online = isinstance(self.config.get("pref"), dict) and self.config.get("online")
        for key, name in (("rl", "rl"), ("rm", "rm"), ("pref", "pref (online)" if online else "pref")):
            if key in self.config:
                return name
        return "sft" if self.config else "?"


def load_run(path: str | Path, label: str | None = None) -> RunData:
    """A run directory's metrics.jsonl, samples.jsonl and config.yaml (the newest checkpoint's manifest for a run
    written before config.yaml was). FileNotFoundError when it has no metrics."""
    path = Path(path)
    records = read_metrics(path)
    if not records:
        raise FileNotFoundError(f"{path}: no metrics.jsonl (is it a posttrain run directory?)")
    series = series_of(records)
    times = [r["time"] for r in records if isinstance(r.get("time"), int | float)]
    first_step = series.get(("train", "step_time_s"), ([], [0.0]))[1][:1] or [0.0]
    seconds = max(times) - min(times) + first_step[0] if times else 0.0  # from the start of the first logged step
    return RunData(label or path.name, path, series, read_samples(path), read_config(path), seconds=seconds)


def series_of(records: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[list[int], list[float]]]:
    """Every finite number of every record, by (kind, metric); non-numbers ("nan" written as text) are left out.
    An `eval_*` metric is an evaluation whatever its record's kind (the trainers log the evaluations of
    train.eval_every in the step's train record and the final one in an eval record): one "eval" series."""
    out: dict[tuple[str, str], tuple[list[int], list[float]]] = {}
    for record in records:
        step, kind = record.get("step"), record.get("kind", "train")
        if not isinstance(step, int):
            continue
        for key, value in record.items():
            if key in NOT_METRICS or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                steps, values = out.setdefault(("eval" if key.startswith("eval_") else kind, key), ([], []))
                steps.append(step)
                values.append(float(value))
    return out


def read_config(path: Path) -> dict[str, Any]:
    config = path / CONFIG_FILE
    if config.is_file():
        loaded = yaml.safe_load(config.read_text(encoding="utf-8"))
        return loaded if isinstance(loaded, dict) else {}
    manifests = sorted((path / "checkpoints").glob("step-*/manifest.json"))
    for manifest in reversed(manifests):
        try:
            flat = json.loads(manifest.read_text(encoding="utf-8")).get("config", {})
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        return nest(flat)
    return {}


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """`{"train.lr": 1}` -> `{"train": {"lr": 1}}`."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def labels_for(paths: list[Path]) -> list[str]:
    """The shortest trailing parts of each path that tell the runs apart (`dpo/seed0`, `ipo/seed0`)."""
    parts = [Path(p).resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so that it starts at the first value.

        m_t = weight * m_{t-1} + (1 - weight) * v_t,  m_0 = 0;   smoothed_t = m_t / (1 - weight^t)
    """
    out, moving = [], 0.0
    for t, value in enumerate(values, start=1):
        moving = weight * moving + (1 - weight) * value
        out.append(moving / (1 - weight**t) if weight < 1 else values[0])
    return out


SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 32) -> str:
    """`values` as at most `width` block characters, each the mean of its share of the values, scaled from the
    lowest (▁) to the highest (█); a constant series is a flat middle line."""
    if not values:
        return ""
    bins = min(width, len(values))
    means = [sum(chunk) / len(chunk) for chunk in _split(values, bins)]
    low, high = min(means), max(means)
    if high - low <= 1e-12 * max(1.0, abs(high)):
        return SPARKS[3] * bins
    return "".join(SPARKS[min(7, int((m - low) / (high - low) * 8))] for m in means)


def _split(values: list[float], bins: int) -> list[list[float]]:
    """`values` cut into `bins` consecutive chunks of sizes differing by at most one."""
    edges = [round(i * len(values) / bins) for i in range(bins + 1)]
    return [values[edges[i] : edges[i + 1]] for i in range(bins)]
