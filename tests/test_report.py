"""`posttrain report RUN [RUN ...]` (issue #25.2): sparklines in the terminal; a self-contained HTML page with a PNG
per logged metric (smoothed and raw, runs overlaid), the time split, samples at several steps and the configs;
the page opened in headless Chromium and screenshotted (skipped where Chromium is not installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from posttrain.cli import main
from posttrain.report.runs import labels_for, load_run, series_of, smooth, sparkline


def test_smoothing_is_tensorboards_debiased_moving_average() -> None:
    # weight 0.5 on [1, 3, 5]: m = 0.5, 1.75, 3.375; debiased by 1 - 0.5^t = 0.5, 0.75, 0.875 -> 1, 2.3333, 3.8571
    assert smooth([1.0, 3.0, 5.0], 0.5) == pytest.approx([1.0, 7 / 3, 27 / 7])
    assert smooth([1.0, 3.0, 5.0], 0.0) == [1.0, 3.0, 5.0]


def test_a_sparkline_scales_bin_means_from_lowest_to_highest() -> None:
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7], width=8) == "▁▂▃▄▅▆▇█"
    # 16 values in 4 bins: means 1.5, 5.5, 9.5, 13.5 -> (m - 1.5) / 12 * 8 = 0, 2.67, 5.33, 8 -> levels 0, 2, 5, 7
    assert sparkline(list(range(16)), width=4) == "▁▃▆█"
    assert sparkline([2.0, 2.0, 2.0]) == "▄▄▄" and sparkline([]) == ""


def test_labels_tell_runs_apart_by_their_shortest_distinct_tail(tmp_path: Path) -> None:
    assert labels_for([tmp_path / "dpo" / "seed0", tmp_path / "ipo" / "seed0"]) == ["dpo/seed0", "ipo/seed0"]
    assert labels_for([tmp_path / "a" / "r1", tmp_path / "b" / "r2"]) == ["r1", "r2"]


def test_series_keep_finite_numbers_and_gather_every_evaluation() -> None:
    records = [
        {"step": 0, "kind": "eval", "eval_accuracy": 0.1},
        {"step": 1, "kind": "train", "loss": 2.0, "grad_norm": "nan", "eval_accuracy": 0.2, "flag": True},
        {"step": 2, "kind": "train", "loss": 1.0},
        {"step": 2, "kind": "eval", "eval_accuracy": 0.3},
    ]
    assert series_of(records) == {("eval", "eval_accuracy"): ([0, 1, 2], [0.1, 0.2, 0.3]),
                                  ("train", "loss"): ([1, 2], [2.0, 1.0])}  # fmt: skip


def write_run(path: Path, *, lr: float, slope: float, steps: int = 30) -> Path:
    """A run directory as an RL run leaves it (metrics, samples, config), written by hand."""
    path.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        lines.append({"step": step, "kind": "train", "time": 1000.0 + step, "loss": 2.0 - slope * step,
                      "rewards/total/mean": slope * step, "kl_per_seq": 0.01 * step, "step_time_s": 1.0,
                      "gen_s": 0.5, "score_s": 0.1, "train_s": 0.3})  # fmt: skip
        if step % 10 == 0:
            lines.append({"step": step, "kind": "train", "time": 1000.0 + step, "eval_accuracy": slope * step})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    samples = [{"step": s, "prompt": f"{s}+1=", "completion": f"<{s + 1}>", "reward": 1.0, "reward/exact": 1.0}
               for s in (1, 10, 20, 30) for _ in range(2)]  # fmt: skip
    (path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    config = {"model": {"path": "m"}, "train": {"lr": lr}, "rl": {"group_size": 8}, "output_dir": str(path)}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    return [write_run(tmp_path / "runs" / "a", lr=1e-3, slope=0.02), write_run(tmp_path / "runs" / "b", lr=3e-4,
                                                                               slope=0.01)]  # fmt: skip


def test_the_terminal_report_has_a_sparkline_per_metric(two_runs: list[Path], capsys) -> None:
    assert main(["report", *map(str, two_runs), "--no-html"]) == 0
    out = capsys.readouterr().out
    # records at times 1001 .. 1030, the first step took 1 s: 1030 - 1001 + 1 = 30 s in steps
    assert "run a (rl): 30 steps, 30.0 s" in out and "run b (rl)" in out
    loss_rows = [line for line in out.splitlines() if "│ loss " in line]
    assert len(loss_rows) == 2 and all("█" in row and "▁" in row for row in loss_rows)
    # run a's evaluations 0.2, 0.4, 0.6 at steps 10, 20, 30: levels (v - 0.2) / 0.4 * 8 = 0, 4, 8 -> ▁▅█
    assert re.search(r"eval_accuracy\s+│ ▁▅█\s+│\s+0.2 │\s+0.6 │", out)
    assert not (two_runs[0] / "report").exists()


def test_the_page_is_self_contained_with_every_metric_plotted_samples_and_config(two_runs, tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "page"
    assert main(["report", *map(str, two_runs), "--output", str(out)]) == 0
    assert f"report: {out / 'index.html'}" in capsys.readouterr().out
    page = (out / "index.html").read_text()
    pngs = sorted((out / "plots").glob("*.png"))
    names = {p.name for p in pngs}
    # every logged metric of both runs, the evaluations, and the time split (bars, and each run over its steps)
    assert {"train-loss.png", "train-rewards_total_mean.png", "train-kl_per_seq.png", "train-step_time_s.png",
            "train-gen_s.png", "eval-eval_accuracy.png", "time-split.png", "time-split-0.png",
            "time-split-1.png"} <= names  # fmt: skip
    assert len(names) == 7 + 1 + 3  # 7 train metrics (score_s, train_s too), 1 evaluation, 3 time splits
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # self-contained: every image inline, nothing fetched from elsewhere, no script
    assert page.count('src="data:image/png;base64,') == len(pngs)
    assert not re.search(r'(src|href)="(?!data:|#)', page) and "<script" not in page
    # samples at several steps, the prompt once over its group; what differs between the configs
    assert "<h4>step 1</h4>" in page and "<h4>step 30</h4>" in page and "&lt;31&gt;" in page
    assert page.count('rowspan="2"') == 8  # 2 runs x 4 shown steps, one prompt of 2 completions each
    assert "<code>train.lr</code></td><td>0.001</td><td>0.0003</td>" in page


def test_several_runs_share_one_plot_and_one_run_writes_into_its_directory(two_runs, capsys) -> None:
    pytest.importorskip("matplotlib")
    assert main(["report", str(two_runs[0])]) == 0
    assert (two_runs[0] / "report" / "index.html").is_file() and "<details open>" in (
        two_runs[0] / "report" / "index.html").read_text()  # fmt: skip


def test_without_matplotlib_the_terminal_report_still_prints(two_runs, monkeypatch, capsys) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["report", str(two_runs[0])]) == 0
    captured = capsys.readouterr()
    assert "run a (rl)" in captured.out and "pip install 'posttrain[report]'" in captured.err


def test_a_directory_without_metrics_and_a_bad_smoothing_are_one_line(tmp_path: Path, two_runs, capsys) -> None:
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert main(["report", str(two_runs[0]), "--smoothing", "1"]) == 2
    assert "smoothing=1.0; give a weight in [0, 1)" in capsys.readouterr().err


def test_a_run_without_config_yaml_reads_its_newest_checkpoints_manifest(tmp_path: Path) -> None:
    run = write_run(tmp_path / "old", lr=1e-3, slope=0.01)
    (run / "config.yaml").unlink()
    manifest = run / "checkpoints" / "step-00000030" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"kind": "sft", "config": {"train.lr": 0.5, "model.path": "m"}}))
    assert load_run(run).config == {"train": {"lr": 0.5}, "model": {"path": "m"}}


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium is not installed (apt-get install "
                    "chromium); the screenshot check needs it")  # fmt: skip
def test_headless_chromium_renders_the_page(two_runs, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from PIL import Image

    out = tmp_path / "page"
    assert main(["report", *map(str, two_runs), "--output", str(out)]) == 0
    shot = screenshot(out / "index.html", tmp_path / "screenshot.png")
    image = Image.open(shot).convert("RGB")
    assert image.size == (1340, 4000)
    # the page rendered: its plots' colours are on it (tab10 blue and orange), not a blank or an error page
    colours = {rgb for _, rgb in image.getcolors(maxcolors=1 << 20)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours and len(colours) > 200


def screenshot(page: Path, png: Path, *, width: int = 1340, height: int = 4000) -> Path:
    """What `docs/tracking.md` runs to look at a report: a headless Chromium screenshot of the page's top."""
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={png}", f"--window-size={width},{height}", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    return png
