"""`posttrain demo`, shortened: every stage runs and demo.json records what each measured."""

import json
from pathlib import Path

from posttrain.demo import run_demo


def test_demo_runs_sft_then_grpo_and_records_three_accuracies(tmp_path: Path) -> None:
    result = run_demo(tmp_path, sft_steps=3, rl_steps=2)
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["accuracy_after_rl"] == result.accuracy_after_rl
    for key in ("accuracy_before", "accuracy_after_sft", "accuracy_after_rl", "thinks_after_sft", "thinks_after_rl"):
        assert 0.0 <= saved[key] <= 1.0
    rl_steps = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rl_steps if m["kind"] == "train"] == [1, 2]
    assert (tmp_path / "rl" / "final" / "config.json").is_file()
