"""PNG plots of a report (matplotlib, the `report` extra): every metric over steps, smoothed and raw, each run in its
own colour; and the time split of a step (generation, scoring, training, the rest)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from posttrain.report.runs import RunData, smooth
from posttrain.report.terminal import display_name

TIME_PARTS = ("gen_s", "score_s", "train_s")
"""The parts of an RL step's time (`step_time_s`) the loop logs; the rest of the step is "other"."""
FEW_POINTS = 12
"""Series this short are drawn with markers (an evaluation every few hundred steps, a short run)."""


def figure(width: float = 6.4, height: float = 3.4) -> tuple:
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.subplots()


def integer_steps(ax: Any) -> None:
    """Ticks on whole steps only."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def colour(index: int) -> str:
    from matplotlib import colormaps

    return colormaps["tab10"](index % 10)


LINESTYLES = ("-", "--", ":", "-.")
"""Run i's line style (with its colour), so that runs whose curves coincide stay apart."""


def file_name(kind: str, metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{kind}-{metric}").strip("_") + ".png"


def plot_metric(runs: list[RunData], kind: str, metric: str, path: Path, *, smoothing: float) -> Path:
    """One metric of every run that logged it: raw values faint, smoothed (TensorBoard's EMA) solid; evaluation
    series and short ones with markers and unsmoothed."""
    fig, ax = figure()
    for index, run in enumerate(runs):
        if (kind, metric) not in run.series:
            continue
        steps, values = run.series[(kind, metric)]
        c, style = colour(index), LINESTYLES[index % len(LINESTYLES)]
        label = run.label if len(runs) > 1 else None
        if kind != "train" or len(values) <= FEW_POINTS:
            ax.plot(steps, values, color=c, linestyle=style, marker="o", markersize=4, linewidth=1.5, label=label)
            continue
        ax.plot(steps, values, color=c, alpha=0.25, linewidth=1.0)
        ax.plot(steps, smooth(values, smoothing), color=c, linestyle=style, linewidth=1.8, label=label)
    ax.set_title(display_name(kind, metric), fontsize=11)
    ax.set_xlabel("step")
    integer_steps(ax)
    ax.grid(alpha=0.3)
    if len(runs) > 1:
        ax.legend(fontsize=8, loc="best")
    fig.savefig(path)
    return path


def has_time_split(run: RunData) -> bool:
    return ("train", "step_time_s") in run.series and all(("train", part) in run.series for part in TIME_PARTS)


def time_split(run: RunData) -> dict[str, list[float]]:
    """Per logged step, the seconds of each part and "other" (step_time_s less the parts, at least 0)."""
    steps, total = run.series[("train", "step_time_s")]
    parts = {part: dict(zip(*run.series[("train", part)])) for part in TIME_PARTS}
    split = {part.removesuffix("_s"): [parts[part].get(s, 0.0) for s in steps] for part in TIME_PARTS}
    split["other"] = [max(0.0, t - sum(split[p][i] for p in ("gen", "score", "train"))) for i, t in enumerate(total)]
    return split


def plot_time_split(runs: list[RunData], path: Path) -> Path:
    """Each run's total seconds of generation, scoring, training and the rest, as stacked horizontal bars."""
    shown = [run for run in runs if has_time_split(run)]
    fig, ax = figure(height=1.6 + 0.45 * len(shown))
    left = [0.0] * len(shown)
    for index, part in enumerate(("gen", "score", "train", "other")):
        totals = [sum(time_split(run)[part]) for run in shown]
        ax.barh([run.label for run in shown], totals, left=left, color=colour(index), label=part)
        left = [a + b for a, b in zip(left, totals)]
    ax.set_xlabel("seconds over the logged steps")
    ax.set_title("time split of a step", fontsize=11)
    ax.invert_yaxis()
    fig.legend(fontsize=8, ncols=4, loc="outside lower center")
    fig.savefig(path)
    return path


def plot_time_split_over_steps(run: RunData, path: Path) -> Path:
    """One run's seconds per step, stacked by part, over its steps."""
    steps, _ = run.series[("train", "step_time_s")]
    split = time_split(run)
    fig, ax = figure()
    ax.stackplot(steps, *split.values(), labels=list(split), colors=[colour(i) for i in range(len(split))], alpha=0.85)
    ax.set_title(f"seconds per step: {run.label}", fontsize=11)
    ax.set_xlabel("step")
    integer_steps(ax)
    ax.grid(alpha=0.3)
    fig.legend(fontsize=8, ncols=4, loc="outside lower center")
    fig.savefig(path)
    return path
