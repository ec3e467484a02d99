"""The demos' claimed gains put to AdaStop (issue #25.3): does each trained model beat the one it started from, over
the seeds the demos ran, with the family-wise error controlled? `posttrain compare` runs the same test on run
directories; here the per-seed accuracies the demos saved are compared directly.

    python bench/adastop_demos.py          # reads bench/rl_demo.json and bench/preference_demo.json

Two designs, both at family-wise error 0.05 (AdaStop, Mathieu et al. 2023, arXiv:2306.10882):
- the demos' own: one interim of all their seeds (n = seeds, K = 1);
- a sequential one for more seeds: n = 3 seeds per interim, at most K = 4 interims; it says how many more seeds
  of each arm the next interim needs.
Each seed's runs are treated as independent draws (AdaStop's setting); the demos pair them by seed (a method starts
from that seed's SFT model), which a paired test would use too, so these verdicts are the cautious ones.
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.report.compare import Comparison, compare_values

HERE = Path(__file__).resolve().parent
ALPHA = 0.05


def claims() -> list[tuple[str, list[float], list[float]]]:
    """(claim, baseline per seed, trained per seed) for every gain the demos report."""
    out = []
    rl = HERE / "rl_demo.json"
    if rl.is_file():
        rows = sorted(json.loads(rl.read_text()), key=lambda r: r["seed"])
        out.append(("GRPO beats its SFT model (rl_demo)", [r["accuracy_after_sft"] for r in rows],
                    [r["accuracy_after_rl"] for r in rows]))  # fmt: skip
        out.append(("SFT beats the untrained model (rl_demo)", [r["accuracy_before"] for r in rows],
                    [r["accuracy_after_sft"] for r in rows]))  # fmt: skip
    pref = HERE / "preference_demo.json"
    if pref.is_file():
        results = json.loads(pref.read_text())
        seeds = sorted(results, key=int)
        methods = [m for m in results[seeds[0]] if isinstance(results[seeds[0]][m], dict) and "accuracy" in
                   results[seeds[0]][m]]  # fmt: skip
        for method in methods:
            out.append((f"{method} beats its SFT model (preference_demo)", [results[s]["sft"] for s in seeds],
                        [results[s][method]["accuracy"] for s in seeds]))  # fmt: skip
    return out


def verdict(result: Comparison) -> str:
    """The trained model is arm A."""
    if result.decision == "A":
        return "gain (decided)"
    if result.decision == "B":
        return "loss (decided)"
    if result.decision == "equal":
        return "no difference found"
    return f"undecided: {result.more_seeds} more seeds each for the next interim (at most {result.at_most_more})"


def table() -> str:
    lines = ["| claim | seeds | mean change | one interim of all seeds | n=3 per interim, K=4 |",
             "|---|---|---|---|---|"]
    for claim, base, trained in claims():
        change = sum(trained) / len(trained) - sum(base) / len(base)
        once = compare_values(trained, base, metric="accuracy", n=len(base), K=1, alpha=ALPHA)
        sequential = compare_values(trained, base, metric="accuracy", n=3, K=4, alpha=ALPHA)
        lines.append(f"| {claim} | {len(base)} | {change:+.1%} | {verdict(once)} | {verdict(sequential)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
