"""`posttrain compare RUNS_A RUNS_B --metric M`: does A beat B, over seeds, with the family-wise error controlled?

AdaStop (Mathieu et al. 2023, arXiv:2306.10882) is a sequential permutation test: runs come in interims of `n`
seeds per arm, at most `K` interims; after each, it decides (A larger, B larger) or asks for `n` more seeds, with
group-sequential boundaries that keep the probability of any wrong "larger" below `alpha` over every look. At the
K-th interim an undecided comparison is declared equal. The test itself is the `adastop` package's (the `compare`
extra), run from scratch on the runs at hand, interim by interim, so that the decision never depends on when
`posttrain compare` was called.

    runs = expand_runs("runs/dpo")                      # a directory of runs, a run, a glob, or a, b, c
    result = compare_runs(runs_a, runs_b, metric="eval_accuracy", n=5, K=5)
    print(result.summary())
"""

from __future__ import annotations

import glob
import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from posttrain.errors import PosttrainError
from posttrain.report.runs import RunData, load_run

Reduce = Literal["last", "mean", "max", "min"]
REDUCERS = {"last": lambda v: v[-1], "mean": lambda v: sum(v) / len(v), "max": max, "min": min}
PAPER = "AdaStop (Mathieu et al. 2023, arXiv:2306.10882)"
SAID = {"larger": "A's mean is larger (equality rejected)", "smaller": "B's mean is larger (equality rejected)",
        "equal": "equal (the design's last interim)", "continue": "continue (no decision yet)"}  # fmt: skip


class CompareError(PosttrainError, ValueError):
    """Runs or settings a comparison cannot use: names what and where."""


@dataclass
class Comparison:
    """What AdaStop decided about A against B on one metric."""

    metric: str
    higher_is_better: bool
    values_a: list[float]
    values_b: list[float]
    n: int
    K: int
    alpha: float
    decision: Literal["A", "B", "equal", "continue"]
    """"A" / "B": that arm's metric is better (rejected equality); "equal": no difference found by the K-th interim;
    "continue": undecided, more seeds needed."""
    interims: int
    """Interims tested (each with n more seeds per arm)."""
    unused: tuple[int, int] = (0, 0)
    """Runs of A and of B beyond the last complete interim (they wait for the next one)."""
    lines: list[str] = field(default_factory=list)
    """What each interim decided, one line each."""

    @property
    def more_seeds(self) -> int:
        """Runs per arm the next interim needs beyond those at hand (0 once decided)."""
        return 0 if self.decision != "continue" else self.n - min(self.unused)

    @property
    def at_most_more(self) -> int:
        """Runs per arm beyond those at hand until the design's last interim forces a decision (0 once decided)."""
        return 0 if self.decision != "continue" else (self.K - self.interims) * self.n - min(self.unused)

    def verdict(self) -> str:
        direction = "higher" if self.higher_is_better else "lower"
        if self.decision in ("A", "B"):
            other = "B" if self.decision == "A" else "A"
            return (f"{self.decision} beats {other}: its {self.metric} is {direction}, after {self.interims} "
                    f"interim(s) of {self.n} seeds per arm; a wrong call of this kind has probability <= {self.alpha}")
        if self.decision == "equal":
            return (f"no difference in {self.metric} found after the design's {self.K} interims of {self.n} seeds per "
                    f"arm (at family-wise error {self.alpha}): treat A and B as equal at this budget")
        if self.interims == 0:
            return (f"undecided: the first interim needs {self.n} runs per arm; {self.more_seeds} more seeds of each "
                    f"(at most {self.at_most_more} more per arm for a decision)")
        return (f"undecided after {self.interims} of {self.K} interims: run {self.more_seeds} more seeds of each for "
                f"the next interim (at most {self.at_most_more} more per arm before the design decides)")

    def summary(self) -> str:
        a, b = describe(self.values_a), describe(self.values_b)
        return "\n".join([
            f"{self.metric}: {'higher' if self.higher_is_better else 'lower'} is better",
            f"A: {a}", f"B: {b}",
            f"{PAPER}: {self.n} seeds per arm per interim, at most {self.K} interims, family-wise error <= "
            f"{self.alpha}",
            *self.lines,
            f"verdict: {self.verdict()}",
        ])  # fmt: skip


def describe(values: list[float]) -> str:
    if not values:
        return "no runs"
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return f"{len(values)} runs, mean {mean:.4g}, std {std:.3g} ({', '.join(f'{v:.4g}' for v in values)})"


def expand_runs(spec: str) -> list[Path]:
    """Run directories from a spec: comma-separated parts, each a run directory (it holds metrics.jsonl), a directory
    of runs (its subdirectories that do), or a glob pattern."""
    found: list[Path] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if any(ch in part for ch in "*?["):
            matched = [Path(p) for p in sorted(glob.glob(part)) if (Path(p) / "metrics.jsonl").is_file()]
        elif (Path(part) / "metrics.jsonl").is_file():
            matched = [Path(part)]
        elif Path(part).is_dir():
            matched = sorted(p for p in Path(part).iterdir() if (p / "metrics.jsonl").is_file())
        else:
            raise CompareError(f"compare: {part} is neither a run directory, a directory of runs nor a glob pattern")
        if not matched:
            raise CompareError(f"compare: {part} holds no posttrain run (no metrics.jsonl in it or under it)")
        found += matched
    return list(dict.fromkeys(found))


def run_value(run: RunData, metric: str, reduce: Reduce) -> float:
    """One run's `metric`: its evaluation series when it has one, else its train series, reduced over the steps."""
    series = run.series.get(("eval", metric)) or run.series.get(("train", metric))
    if series is None:
        logged = sorted({m for _, m in run.series})
        raise CompareError(f"compare: {run.path} logged no {metric!r}; it logged: {', '.join(logged)}")
    return float(REDUCERS[reduce](series[1]))


def seed_order(run: RunData) -> tuple[int, str]:
    seed = run.config.get("seed")
    return (seed if isinstance(seed, int) else 1 << 62, str(run.path))


def compare_runs(
    runs_a: Sequence[str | Path], runs_b: Sequence[str | Path], *, metric: str, reduce: Reduce = "last",
    higher_is_better: bool = True, n: int = 5, K: int = 5, alpha: float = 0.05, permutations: int = 10_000,
    seed: int = 0,
) -> Comparison:  # fmt: skip
    """AdaStop on `metric` (each run's value reduced by `reduce`) of runs A against runs B; runs enter interims in
    the order of their config's seed."""
    if reduce not in REDUCERS:
        raise CompareError(f"compare: reduce={reduce!r}; allowed: {', '.join(REDUCERS)}")
    arms = [sorted((load_run(p) for p in runs), key=seed_order) for runs in (runs_a, runs_b)]
    values_a, values_b = ([run_value(r, metric, reduce) for r in arm] for arm in arms)
    return compare_values(values_a, values_b, metric=metric, higher_is_better=higher_is_better, n=n, K=K,
                          alpha=alpha, permutations=permutations, seed=seed)  # fmt: skip


def compare_values(
    values_a: Sequence[float], values_b: Sequence[float], *, metric: str = "metric", higher_is_better: bool = True,
    n: int = 5, K: int = 5, alpha: float = 0.05, permutations: int = 10_000, seed: int = 0,
) -> Comparison:  # fmt: skip
    """AdaStop on two lists of per-seed values, interim by interim over the complete interims at hand (values
    beyond the last complete interim wait for the next)."""
    if n < 1 or K < 1:
        raise CompareError(f"compare: n={n}, K={K}; give at least 1 seed per interim and 1 interim")
    if not 0 < alpha < 1:
        raise CompareError(f"compare: alpha={alpha}; give a level in (0, 1), e.g. 0.05")
    if importlib.util.find_spec("adastop") is None:
        raise CompareError("compare: AdaStop needs the adastop package: pip install 'posttrain[compare]'")
    import numpy as np
    from adastop import MultipleAgentsComparator

    values_a, values_b = [float(v) for v in values_a], [float(v) for v in values_b]
    available = min(len(values_a), len(values_b)) // n
    comparator = MultipleAgentsComparator(n=n, K=K, B=permutations, alpha=alpha, seed=seed)
    decision, interims, lines = "continue", 0, []
    for k in range(min(available, K)):
        used = (k + 1) * n
        comparator.partial_compare({"A": np.array(values_a[:used]), "B": np.array(values_b[:used])}, verbose=False)
        interims = k + 1
        said = next(iter(comparator.decisions.values()))  # "larger": A's mean is above B's; "smaller", "equal"
        decision = {"larger": "A", "smaller": "B", "equal": "equal"}.get(said, "continue")
        if decision in ("A", "B") and not higher_is_better:
            decision = "B" if decision == "A" else "A"
        lines.append(f"interim {interims} ({used} + {used} runs): {SAID[said]}")
        if comparator.is_finished:
            break
    unused = (len(values_a) - interims * n, len(values_b) - interims * n)
    return Comparison(metric, higher_is_better, values_a, values_b, n, K, alpha, decision, interims, unused, lines)
