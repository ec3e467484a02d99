"""The demo's SFT -> GRPO figure over several seeds (issue #4, item 5): `posttrain demo` once per seed.

    python bench/rl_demo.py                  # seeds 0 1 2
    python bench/rl_demo.py --seeds 0 --rl-steps 50

Each seed builds its own model, runs the demo's SFT and GRPO stages (src/posttrain/demo.py has their
settings) and measures held-out greedy accuracy before training, after SFT and after GRPO on the same
300 held-out problems, and the share of greedy answers that work the sum out in <think> first. Writes
bench/rl_demo.json and prints a markdown table (per seed and mean).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
MEANS = ("accuracy_before", "accuracy_after_sft", "accuracy_after_rl", "thinks_after_sft", "thinks_after_rl", "seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rl-steps", type=int, default=None, help="GRPO steps (default: the demo's)")
    parser.add_argument("--output-dir", default="runs/rl-demo")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (keep within the cores)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    from posttrain.demo import run_demo

    rows = []
    for seed in args.seeds:
        result = run_demo(Path(args.output_dir) / f"seed{seed}", seed, rl_steps=args.rl_steps)
        rows.append({"seed": seed, **vars(result)})
    (HERE / "rl_demo.json").write_text(json.dumps(rows, indent=1))
    print(markdown_table(rows))
    from adastop_demos import table as adastop_table  # beside this script: AdaStop on the gains over the seeds

    print(adastop_table())


def markdown_table(rows: list[dict]) -> str:
    keys = ("accuracy_before", "accuracy_after_sft", "accuracy_after_rl")
    lines = [
        "| seed | before | after SFT | after SFT + GRPO | GRPO gain | thinks first (SFT -> GRPO) | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in [*rows, {"seed": "mean", **{k: statistics.mean(r[k] for r in rows) for k in rows[0] if k in MEANS}}]:
        gain = r["accuracy_after_rl"] - r["accuracy_after_sft"]
        cells = " | ".join(f"{r[k]:.1%}" for k in keys)
        thinks = f"{r['thinks_after_sft']:.0%} -> {r['thinks_after_rl']:.0%}"
        lines.append(f"| {r['seed']} | {cells} | {gain:+.1%} | {thinks} | {r['seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
