"""`posttrain report RUN [RUN ...]`: a self-contained HTML page (the PNGs embedded as base64, no external script or
style) and the PNGs beside it: every logged metric over steps, smoothed and raw, several runs overlaid; the time
split of a step; sampled completions at several steps; each run's config, and what differs between the runs."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from posttrain.report.plots import file_name, has_time_split, plot_metric, plot_time_split, plot_time_split_over_steps
from posttrain.report.runs import RunData
from posttrain.report.sections import ORDER, ordered, section_of
from posttrain.report.terminal import duration, number

PAGE = "index.html"
PLOTS = "plots"
SAMPLE_STEPS = 4
"""Logged steps whose samples are shown: the first, the last, and ones evenly between."""
SAMPLE_ROWS = 8
"""Completions shown per run and step."""
COUNTS = ("_examples", "_pairs")
"""Evaluation metrics that count what was evaluated: plotted, but not headline columns."""
HEADLINE = ("loss", "rewards/total/mean", "accuracy", "pref_accuracy", "sample_accuracy", "kl_per_seq")

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1340px;
       padding: 0 24px 48px; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.6em; margin: 24px 0 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; }
nav a { margin-right: 14px; } .muted { color: #666; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 12px; }
figure { margin: 0; } figure img { width: 100%; height: auto; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: 0.9em; margin: 8px 0 16px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f5f5f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.text { font-family: ui-monospace, Menlo, monospace; white-space: pre-wrap; max-width: 480px; }
pre { background: #f5f5f7; padding: 12px; overflow-x: auto; font-size: 0.85em; }
details { margin: 8px 0; } summary { cursor: pointer; font-weight: 600; }
"""


def write_report(runs: list[RunData], out_dir: str | Path, *, smoothing: float = 0.6) -> Path:
    """Write `out_dir`/index.html and `out_dir`/plots/*.png for `runs`; returns the page's path."""
    out = Path(out_dir)
    plots = out / PLOTS
    plots.mkdir(parents=True, exist_ok=True)
    figures: dict[str, list[Path]] = {}
    for kind, metric in ordered([key for run in runs for key in run.series]):
        png = plot_metric(runs, kind, metric, plots / file_name(kind, metric), smoothing=smoothing)
        figures.setdefault(section_of(metric), []).append(png)
    timed = [run for run in runs if has_time_split(run)]
    if timed:
        split = [plot_time_split(runs, plots / "time-split.png")]
        split += [plot_time_split_over_steps(run, plots / f"time-split-{i}.png") for i, run in enumerate(timed)]
        figures["Time split"] = split
    page = out / PAGE
    page.write_text(render(runs, figures, smoothing=smoothing), encoding="utf-8")
    return page


def render(runs: list[RunData], figures: dict[str, list[Path]], *, smoothing: float) -> str:
    sections = [name for name in [*ORDER, "Time split"] if name in figures]
    nav = " ".join(f'<a href="#{anchor(s)}">{s}</a>' for s in [*sections, "Samples", "Config"])
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>posttrain report: {esc(', '.join(r.label for r in runs))}</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>posttrain report</h1>",
        f'<p class="muted">{len(runs)} run{"s" if len(runs) > 1 else ""}; curves: raw (faint) and smoothed '
        f"(exponential moving average, weight {smoothing}, debiased as TensorBoard does); evaluations as points.</p>",
        f"<nav>{nav}</nav>",
        overview(runs),
    ]
    for section in sections:
        parts.append(f'<h2 id="{anchor(section)}">{esc(section)}</h2><div class="grid">')
        parts += [f'<figure><img alt="{esc(png.stem)}" src="{data_uri(png)}"></figure>' for png in figures[section]]
        parts.append("</div>")
        if section == "Time split":
            parts.append(time_table([run for run in runs if has_time_split(run)]))
    parts.append('<h2 id="samples">Samples</h2>')
    parts += [samples_block(run) for run in runs]
    parts.append('<h2 id="config">Config</h2>')
    if len(runs) > 1:
        parts.append(config_differences(runs))
    for run in runs:
        dumped = yaml.safe_dump(run.config, sort_keys=False) if run.config else "(no config.yaml in the run directory)"
        opened = " open" if len(runs) == 1 else ""
        parts.append(f"<details{opened}><summary>{esc(run.label)}</summary><pre>{esc(dumped)}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def overview(runs: list[RunData]) -> str:
    headline = [m for m in HEADLINE if any(("train", m) in r.series for r in runs)]
    evals = sorted({m for r in runs for k, m in r.series if k == "eval" and not m.endswith(COUNTS)})
    head = ["run", "trainer", "directory", "steps", "time in steps"] + [f"last {m}" for m in headline]
    head += [f"final eval: {m}" for m in evals]
    rows = []
    for run in runs:
        cells = [esc(run.label), esc(run.trainer), esc(str(run.path)), num(run.steps), duration(run.seconds)]
        cells += [num(run.series[("train", m)][1][-1]) if ("train", m) in run.series else "" for m in headline]
        cells += [num(run.series[("eval", m)][1][-1]) if ("eval", m) in run.series else "" for m in evals]
        rows.append(cells)
    return table(head, rows)


def time_table(runs: list[RunData]) -> str:
    from posttrain.report.plots import time_split

    rows = []
    for run in runs:
        split = {part: sum(values) for part, values in time_split(run).items()}
        total = sum(split.values()) or 1.0
        rows.append([esc(run.label), *(f"{split[p]:.1f} s ({100 * split[p] / total:.0f}%)" for p in split)])
    return table(["run", "generation", "scoring", "training", "other"], rows)


def samples_block(run: RunData) -> str:
    if not run.samples:
        return f'<p class="muted">{esc(run.label)}: no sampled completions (samples.jsonl is written by the online ' \
               "trainers, on log.samples_every)</p>"
    steps = sorted({row["step"] for row in run.samples if isinstance(row.get("step"), int)})
    chosen = sorted({steps[round(i * (len(steps) - 1) / max(1, SAMPLE_STEPS - 1))] for i in range(SAMPLE_STEPS)})
    parts = [f"<h3>{esc(run.label)}</h3>"]
    for step in chosen:
        rows = [row for row in run.samples if row.get("step") == step][:SAMPLE_ROWS]
        columns = [c for c in dict.fromkeys(k for row in rows for k in row) if c != "step"]
        body = []
        for i, row in enumerate(rows):  # a prompt's completions follow each other: the prompt once, over them all
            cells = [cell(row.get(c), c) for c in columns]
            if "prompt" in columns:
                at = columns.index("prompt")
                if i and rows[i - 1].get("prompt") == row.get("prompt"):
                    del cells[at]
                else:
                    span = next((j for j in range(i, len(rows)) if rows[j].get("prompt") != row.get("prompt")),
                                len(rows)) - i  # fmt: skip
                    cells[at] = cells[at].replace("<td ", f'<td rowspan="{span}" ', 1)
            body.append(cells)
        parts.append(f"<h4>step {step}</h4>" + table(columns, body))
    return "\n".join(parts)


def config_differences(runs: list[RunData]) -> str:
    flat = [dict(flatten(run.config)) for run in runs]
    keys = sorted({k for f in flat for k in f if k not in ("output_dir",)})
    differing = [k for k in keys if len({yaml.safe_dump(f.get(k)) for f in flat}) > 1]
    if not differing:
        return '<p class="muted">The runs\' configs are the same (output_dir aside).</p>'
    rows = [[f"<code>{esc(k)}</code>", *(esc(short(f.get(k))) for f in flat)] for k in differing]
    return "<p>What differs between the runs' configs:</p>" + table(["key", *(r.label for r in runs)], rows)


def flatten(raw: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in raw.items():
        if isinstance(value, dict) and value:
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def table(head: list[str], rows: list[list[str]]) -> str:
    """An HTML table: `head` is text (escaped here), each cell already HTML (escaped text, or a whole <td>)."""
    header = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in row) + "</tr>"
                   for row in rows)  # fmt: skip
    return f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"


def cell(value: Any, column: str) -> str:
    if isinstance(value, float):
        return f'<td class="num">{num(value)}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="num">{value}</td>'
    text = "" if value is None else str(value)
    return f'<td class="text">{esc(text)}</td>' if column in ("prompt", "completion") else f"<td>{esc(text)}</td>"


def num(value: float) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return esc(str(value))
    return number(float(value))


def short(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
    return text if len(text) <= 80 else text[:77] + "..."


def data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def anchor(name: str) -> str:
    return name.lower().replace(" ", "-")


def esc(text: str) -> str:
    return html.escape(text, quote=True)

