"""`posttrain compare RUNS_A RUNS_B --metric M` (issue #25.3): AdaStop's sequential multi-seed comparison, saying
whether A beats B, with what error control, and how many more seeds a decision needs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from posttrain.cli import main
from posttrain.report.compare import CompareError, compare_runs, compare_values, expand_runs

pytest.importorskip("adastop")


def test_one_interim_of_two_seeds_is_the_permutation_test_worked_by_hand() -> None:
    # A = [3, 4], B = [1, 2]: the 6 splits of {1, 2, 3, 4} into two pairs give mean differences -2, -1, 0, 0, 1, 2;
    # P(D > d) for these sorted values is 5/6, 4/6, 3/6, 2/6, 1/6, 0. The boundary is the smallest d with
    # P(D > d) <= alpha, and A beats B when |observed| = 2 exceeds it.
    # alpha 0.05: only d = 2 qualifies, 2 > 2 fails -> no decision; at the design's one interim: equal
    strict = compare_values([3, 4], [1, 2], n=2, K=1, alpha=0.05)
    assert strict.decision == "equal" and strict.interims == 1
    assert "no difference in metric found after the design's 1 interims of 2 seeds" in strict.verdict()
    # alpha 0.2: d = 1 (P = 1/6 <= 0.2) is the boundary, 2 > 1 -> A beats B
    loose = compare_values([3, 4], [1, 2], n=2, K=1, alpha=0.2)
    assert loose.decision == "A" and "A beats B" in loose.verdict() and "<= 0.2" in loose.verdict()
    # the same numbers where lower is better: B beats A
    assert compare_values([3, 4], [1, 2], n=2, K=1, alpha=0.2, higher_is_better=False).decision == "B"


def test_separated_arms_are_decided_at_the_first_interim() -> None:
    result = compare_values([0.90, 0.91, 0.92, 0.93, 0.94], [0.10, 0.11, 0.12, 0.13, 0.14], n=5, K=3)
    assert result.decision == "A" and result.interims == 1 and result.more_seeds == 0


def test_undecided_says_how_many_more_seeds_the_next_interim_and_a_decision_need() -> None:
    # 4 runs of A, 3 of B, 3 seeds per interim, at most 4 interims: one interim tested (3 + 3), undecided
    result = compare_values([0.36, 0.387, 0.329, 0.35], [0.406, 0.433, 0.377], n=3, K=4)
    assert result.decision == "continue" and result.interims == 1 and result.unused == (1, 0)
    # the next interim needs 6 runs per arm: B has 3 -> 3 more; the last (4 x 3 = 12) -> at most 9 more
    assert (result.more_seeds, result.at_most_more) == (3, 9)
    assert "run 3 more seeds of each for the next interim (at most 9 more per arm" in result.verdict()
    # fewer runs than one interim: nothing tested yet
    early = compare_values([0.36, 0.387], [0.406, 0.433, 0.377], n=5, K=2)
    assert early.interims == 0 and (early.more_seeds, early.at_most_more) == (3, 8)


def write_run(path: Path, seed: int, accuracy: float) -> Path:
    path.mkdir(parents=True)
    records = [{"step": 1, "kind": "train", "loss": 1.0 - accuracy}, {"step": 2, "kind": "train", "loss": 0.5},
               {"step": 2, "kind": "eval", "eval_accuracy": accuracy}]  # fmt: skip
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "train": {"lr": 0.1}}))
    return path


@pytest.fixture
def arms(tmp_path: Path) -> tuple[Path, Path]:
    # seeds written out of order: they enter the interims by seed
    for seed, acc in ((2, 0.93), (0, 0.91), (1, 0.92)):
        write_run(tmp_path / "dpo" / f"run-{seed}", seed, acc)
        write_run(tmp_path / "ipo" / f"run-{seed}", seed, acc - 0.5)
    return tmp_path / "dpo", tmp_path / "ipo"


def test_runs_enter_by_seed_with_their_last_evaluation(arms) -> None:
    dpo, ipo = arms
    result = compare_runs(expand_runs(str(dpo)), expand_runs(str(ipo)), metric="eval_accuracy", n=3, K=2,
                          alpha=0.2)  # fmt: skip
    assert result.values_a == [0.91, 0.92, 0.93] and result.values_b == pytest.approx([0.41, 0.42, 0.43])
    assert result.decision == "A"
    # the mean of a train series, where lower is better
    losses = compare_runs(expand_runs(str(dpo)), expand_runs(str(ipo)), metric="loss", reduce="mean",
                          higher_is_better=False, n=3, K=2, alpha=0.2)  # fmt: skip
    assert losses.values_a == pytest.approx([(0.09 + 0.5) / 2, (0.08 + 0.5) / 2, (0.07 + 0.5) / 2])
    assert losses.decision == "A"  # A's loss is lower


def test_runs_from_a_directory_a_glob_or_a_list(arms, tmp_path: Path) -> None:
    dpo, ipo = arms
    assert [p.name for p in expand_runs(str(dpo))] == ["run-0", "run-1", "run-2"]
    assert [p.name for p in expand_runs(str(tmp_path / "*" / "run-1"))] == ["run-1", "run-1"]
    assert len(expand_runs(f"{dpo / 'run-0'}, {ipo / 'run-2'}")) == 2
    with pytest.raises(CompareError, match="is neither a run directory"):
        expand_runs(str(tmp_path / "missing"))


def test_the_command_prints_the_arms_the_test_and_the_verdict(arms, capsys) -> None:
    dpo, ipo = arms
    assert main(["compare", str(dpo), str(ipo), "--metric", "eval_accuracy", "--n", "3", "--k", "2",
                 "--alpha", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "A: 3 runs, mean 0.92" in out and "AdaStop (Mathieu et al. 2023, arXiv:2306.10882)" in out
    assert "verdict: A beats B: its eval_accuracy is higher, after 1 interim(s) of 3 seeds per arm" in out
    # a metric no run logged: one line naming the run and what it logged
    assert main(["compare", str(dpo), str(ipo), "--metric", "reward"]) == 2
    err = capsys.readouterr().err
    assert "logged no 'reward'; it logged: eval_accuracy, loss" in err


def test_the_bench_table_of_the_demos_gains_is_what_results_md_shows() -> None:
    import importlib.util

    root = Path(__file__).parents[1]
    spec = importlib.util.spec_from_file_location("adastop_demos", root / "bench" / "adastop_demos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.table().splitlines()
    results = (root / "bench" / "RESULTS.md").read_text()
    assert len(rows) == 2 + 7 and all(row in results for row in rows), "rerun python bench/adastop_demos.py"
    assert "| GRPO beats its SFT model (rl_demo) | 3 | +34.3% | gain (decided) |" in rows[2]
