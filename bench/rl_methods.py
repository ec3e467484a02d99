"""New online RL objectives against plain GRPO at equal compute (issue #27): the demo's setting, over seeds.

    python bench/rl_methods.py                          # seeds 0 1 2; grpo gmpo sapo
    python bench/rl_methods.py --seeds 0 --methods grpo bnpo --rl-steps 30

Per seed S: the SFT model of `posttrain sft recipes/arith-sft-think.yaml seed=S` (30% of the demonstrations work the
sum out in <think> first; trained into runs/arith-sft-think[-sS] when its final/ is missing), then, from that same
model, `posttrain rl recipes/arith-grpo-think.yaml` (GRPO, the demo's RL stage: 60 steps of 32 prompts x 8 samples)
with the method's overrides below, each run with the same seed, steps, prompts, samples and learning rate. Held-out
greedy accuracy on the 300 held-out problems after SFT and after each method. Writes bench/rl_methods.json and prints
a markdown table (per seed, mean and the spread over seeds).

Each method's overrides are its preset's values that differ from GRPO (recipes/arith-<method>.yaml), on the demo's
setting; a method whose paper runs without a KL term (GMPO, BNPO, NFT) runs without it, so it differs from GRPO in
that too (gmpo_kl is GMPO with GRPO's KL term, the policy loss alone changed). NFT's dynamic sampling draws more
batches when groups tie: it is not equal compute.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS: dict[str, list[str]] = {
    "grpo": [],
    "gmpo": ["rl.policy_loss=gmpo", "rl.policy_loss_args={clip_low: 0.4, clip_high: 0.4}", "rl.kl.coef=0.0"],
    "gmpo_kl": ["rl.policy_loss=gmpo", "rl.policy_loss_args={clip_low: 0.4, clip_high: 0.4}"],  # GRPO's KL kept
    "sapo": ["rl.policy_loss=sapo", "rl.policy_loss_args={tau_pos: 1.0, tau_neg: 1.05}"],
    "bnpo": ["rl.advantage=bnpo", "rl.policy_loss_args={clip_low: 0.2, clip_high: 0.28}",
             "rl.loss_aggregation=seq_mean_token_sum_norm", "rl.kl.coef=0.0"],
    "spo": ["rl.advantage=spo"],
    "nft": ["rl.policy_loss=nft", "rl.loss_aggregation=seq_mean_token_sum_norm", "rl.dynamic_sampling=true",
            "rl.kl.coef=0.0"],
}  # fmt: skip


def sft_dir(seed: int) -> Path:
    return ROOT / ("runs/arith-sft-think" if seed == 0 else f"runs/arith-sft-think-s{seed}")


def ensure_sft(seed: int) -> tuple[Path, float]:
    """The seed's SFT model and its held-out greedy accuracy (trained first when missing)."""
    from posttrain.api import evaluate, sft
    from posttrain.config.loading import read_recipe

    final = sft_dir(seed) / "final"
    if not (final / "config.json").is_file():
        sft(str(ROOT / "recipes/arith-sft-think.yaml"), overrides=[f"seed={seed}", f"output_dir={sft_dir(seed)}"],
            progress=False)  # fmt: skip
    task = read_recipe(ROOT / "recipes/arith-grpo-think.yaml")["data"]["task"]
    config = {"model": {"path": str(final)}, "data": {"task": task}, "eval": {"max_new_tokens": 32},
              "output_dir": str(sft_dir(seed) / "eval"), "seed": seed}  # fmt: skip
    return final, evaluate(config).greedy_accuracy


def run_method(method: str, seed: int, model_dir: Path, rl_steps: int | None) -> dict[str, float]:
    from posttrain.api import rl

    out = ROOT / f"runs/rl-methods/s{seed}/{method}"
    overrides = [f"model.path={model_dir}", f"seed={seed}", f"output_dir={out}", *METHODS[method]]
    if rl_steps:
        overrides.append(f"train.max_steps={rl_steps}")
    started = time.perf_counter()
    result = rl(str(ROOT / "recipes/arith-grpo-think.yaml"), overrides=overrides, progress=False)
    return {"accuracy": result.eval.greedy_accuracy, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["grpo", "gmpo", "sapo"], choices=list(METHODS))
    parser.add_argument("--rl-steps", type=int, default=None, help="RL steps (default: the recipe's 60)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (keep within the cores)")
    parser.add_argument("--out", default=str(ROOT / "bench/rl_methods.json"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    results = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    for seed in args.seeds:
        entry = results.setdefault(str(seed), {})
        model_dir, entry["sft"] = ensure_sft(seed)
        print(f"seed {seed}: SFT {entry['sft']:.1%}", flush=True)
        for method in args.methods:
            entry[method] = run_method(method, seed, model_dir, args.rl_steps)
            print(f"seed {seed}: {method} {entry[method]['accuracy']:.1%} in {entry[method]['seconds']:.0f} s",
                  flush=True)  # fmt: skip
            Path(args.out).write_text(json.dumps(results, indent=1))
    print(table(results, args.methods))


def table(results: dict, methods: list[str]) -> str:
    """Markdown: held-out greedy accuracy per seed, the mean, and the change from GRPO on the same SFT model."""
    seeds = sorted(results, key=int)
    head = "| method | mean (sd over seeds) | vs GRPO, mean (per seed) | " + " | ".join(f"seed {s}" for s in seeds)
    lines = [head + " | wall time per run |", "|---" * (len(seeds) + 4) + "|"]
    sft = [results[s]["sft"] for s in seeds]
    lines.append(f"| SFT model | {statistics.mean(sft):.1%} | | " + " | ".join(f"{v:.1%}" for v in sft) + " | |")
    for method in methods:
        values = [results[s][method]["accuracy"] for s in seeds]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        vs = [results[s][method]["accuracy"] - results[s]["grpo"]["accuracy"] for s in seeds if "grpo" in results[s]]
        versus = f"{statistics.mean(vs):+.1%} ({', '.join(f'{d:+.1%}' for d in vs)})" if vs else ""
        seconds = statistics.mean(results[s][method]["seconds"] for s in seeds)
        cells = " | ".join(f"{v:.1%}" for v in values)
        mean = statistics.mean(values)
        lines.append(f"| {method} | {mean:.1%} ({spread:.1%}) | {versus} | {cells} | {seconds:.0f} s |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
