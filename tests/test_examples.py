"""docs/examples.md runs as written (issue #25.6): every block of the page, in order, in a fresh directory holding
the recipes, python blocks with this interpreter and bash blocks with its `posttrain` first on PATH; each must exit
0, and what the examples say they write must be there."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGE = (ROOT / "docs" / "examples.md").read_text(encoding="utf-8")


def blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block of the page, in order."""
    return re.findall(r"```(python|bash)\n(.*?)```", PAGE, re.DOTALL)


def test_the_page_has_an_example_per_trainer() -> None:
    commands = " ".join(code for language, code in blocks() if language == "bash")
    for trainer in ("posttrain sft", "posttrain rl", "posttrain pref", "posttrain rm"):
        assert trainer in commands
    assert "online_dpo" in commands and "model.path=my-model" in commands and "data.train=chat.jsonl" in commands


@pytest.mark.slow
def test_every_block_runs_as_written(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for index, (language, code) in enumerate(blocks()):
        command = [sys.executable, "-c", code] if language == "python" else ["bash", "-euo", "pipefail", "-c", code]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"block {index + 1} ({language}) exited {done.returncode}:\n{code}\n" \
                                     f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"  # fmt: skip
    runs = tmp_path / "runs"
    for run in ("my-sft", "ex-sft", "ex-grpo", "ex-dpo", "ex-kto", "ex-online-dpo", "ex-rm"):
        assert (runs / run / "final" / "config.json").is_file(), run
    config = (runs / "my-sft" / "config.yaml").read_text()
    assert "path: my-model" in config and "epochs: 60.0" in config
    assert len([r for r in map(json.loads, (runs / "my-sft" / "metrics.jsonl").open()) if r["kind"] == "train"]) == 300
    steps = {json.loads(line)["step"] for line in (runs / "ex-grpo" / "samples.jsonl").open()}
    assert steps == {1, 5, 10, 15, 20}
    assert (runs / "ex-grpo" / "report" / "index.html").is_file()
    assert (runs / "ex-online-dpo" / "samples.jsonl").is_file()
