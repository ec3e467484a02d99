"""Every run says what it did to its held-out rows (issue #29.4): the share correct before and after, against the
noise of one evaluation, and a warning when it fell by more than that."""

from pathlib import Path

import pytest

from posttrain.api import sft
from posttrain.trainers.lifecycle import held_out_change


def test_the_change_is_weighed_against_two_standard_errors() -> None:
    # n = 100: 0.5 -> 0.4, noise 2 sqrt(0.25/100 + 0.24/100) = 2 * 0.07 = 0.14 > 0.10: no warning
    lines = held_out_change({"eval_accuracy": 0.5}, {"eval_accuracy": 0.4, "eval_examples": 100.0})
    assert lines == ["held-out change: eval_accuracy 0.5000 -> 0.4000 (-10.0 points; noise ±14.0 over 100)"]
    # 0.5 -> 0.3: noise 2 sqrt(0.0025 + 0.0021) = 0.1356 < 0.20: a warning
    lines = held_out_change({"eval_accuracy": 0.5}, {"eval_accuracy": 0.3, "eval_examples": 100.0})
    assert len(lines) == 2 and lines[1].startswith("WARNING: held-out eval_accuracy fell by 20.0 points")
    # pair accuracy counts pairs: 2 sqrt(0.09/400 + 0.0475/400) = 2 * 0.01854 = 0.0371
    lines = held_out_change({"eval_pref_accuracy": 0.9}, {"eval_pref_accuracy": 0.95, "eval_pairs": 400.0})
    assert lines == ["held-out change: eval_pref_accuracy 0.9000 -> 0.9500 (+5.0 points; noise ±3.7 over 400)"]
    # a metric that is not a share says nothing
    assert held_out_change({"eval_loss": 2.0}, {"eval_loss": 3.0, "eval_examples": 10.0}) == []


@pytest.mark.slow
def test_a_run_that_makes_the_model_worse_says_so(tmp_path: Path, capsys) -> None:
    task = {"name": "arithmetic", "digits": 1, "operators": "+", "train_size": 400, "eval_size": 64}
    base = {"model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic"}, "data": {"task": task},
            "train": {"max_steps": 150, "batch_size": 32, "lr": 3e-3}, "eval": {"max_new_tokens": 3},
            "output_dir": str(tmp_path / "good")}  # fmt: skip
    good = sft(base, progress=False)
    assert good.eval.greedy_accuracy > 0.3
    wrong = [{"prompt": f"{a}+{b}=", "completion": str(a + b + 1)} for a in range(10) for b in range(10)]
    sft({"model": {"path": str(good.final_dir)}, "data": {"task": task},
         "train": {"max_steps": 60, "batch_size": 32, "lr": 3e-3}, "eval": {"max_new_tokens": 3},
         "output_dir": str(tmp_path / "worse")}, train=wrong, progress=False)  # fmt: skip
    said = capsys.readouterr()
    assert "WARNING: held-out eval_accuracy fell by" in said.out + said.err
