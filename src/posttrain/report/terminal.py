"""`posttrain report` in the terminal: per run, every logged metric as a sparkline over its steps with its first,
last, lowest and highest value."""

from __future__ import annotations

from rich.table import Table

from posttrain.report.runs import RunData, sparkline
from posttrain.report.sections import ordered, section_of


def run_table(run: RunData, *, width: int = 32) -> Table:
    """One row per (kind, metric), by section (`report.sections`): name, sparkline, first, last, min, max, points."""
    took = f", {duration(run.seconds)}" if run.seconds else ""
    table = Table(title=f"run {run.label} ({run.trainer}): {run.steps} steps{took}", title_justify="left")
    for column, justify in (("section", "left"), ("metric", "left"), ("trend", "left"), ("first", "right"),
                            ("last", "right"), ("min", "right"), ("max", "right"), ("points", "right")):
        table.add_column(column, justify=justify, no_wrap=column in ("trend", "metric"))  # fmt: skip
    previous = None
    for kind, metric in ordered(list(run.series)):
        _, values = run.series[(kind, metric)]
        section = section_of(metric)
        name = display_name(kind, metric)
        table.add_row(section if section != previous else "", name, sparkline(values, width), number(values[0]),
                      number(values[-1]), number(min(values)), number(max(values)), str(len(values)))  # fmt: skip
        previous = section
    return table


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def display_name(kind: str, metric: str) -> str:
    """`loss`, `eval_accuracy`; an evaluation metric without the eval_ prefix as `eval: name`."""
    return metric if kind == "train" or metric.startswith(f"{kind}_") else f"{kind}: {metric}"


def number(value: float) -> str:
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.4g}"
