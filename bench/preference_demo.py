"""Preference demo (issue #5, item 5): from the arithmetic SFT model, build a preference set from its own
samples judged by the verifier, train DPO, IPO, SimPO and KTO on it offline and online DPO on fresh
samples, and measure held-out greedy accuracy before and after each, over several seeds.

    python bench/preference_demo.py                                  # seeds 0 1 2, every method
    python bench/preference_demo.py --seeds 0 --methods dpo online_dpo

Per seed S (all on CPU):
  1. SFT model: runs/arith-sft (S = 0) or runs/arith-sft-sS; trained with
     `posttrain sft recipes/arith-sft.yaml seed=S output_dir=...` when its final/ is missing.
  2. Preference set, in runs/arith-sft[-sS]/self-prefs/: for each of --prompts training prompts (the SFT
     run's own problems) the SFT model's greedy answer and --samples - 1 samples at temperature 1,
     scored by numeric_match; each prompt with a right and a wrong answer gives one pair, the first right
     against the first wrong with the greedy answer first (`pairing.best_vs_worst`), so a wrong greedy
     answer is the rejected one. Written as pairs.jsonl, and as unpaired.jsonl (both sides of each pair,
     labelled) for KTO and BCO, and as lists.jsonl for the listwise presets: each prompt's first 4 distinct
     answers graded by their distance to the right answer (0 right, -|answer - right answer| otherwise, -100
     without a number), kept when a right and a wrong one are among them. Pairs with an empty answer (EOS
     first) are left out, and lists holding one.
  3. `posttrain pref recipes/arith-self-<method>.yaml` on that set (DPO, IPO, SimPO, KTO by default; --methods
     names any of the offline presets) and
     `posttrain pref recipes/arith-online_dpo.yaml`, each with model.path, seed and output_dir set.
  4. Held-out greedy accuracy on the seed's first 1000 held-out problems (drawn with replacement; the
     first 300 are the SFT run's held-out set) of the SFT model and of each result.

Writes bench/preference_demo.json and prints a markdown table (mean and per-seed values).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, or torch starts 2 threads (DESIGN.md)
import torch

from posttrain.api import evaluate, pref, sft
from posttrain.objectives.pairing import best_vs_worst
from posttrain.policies import load_model, load_tokenizer
from posttrain.rewards import load_reward_fn
from posttrain.rollout import ENGINES, SamplingParams
from posttrain.tasks import ArithmeticTask

ROOT = Path(__file__).resolve().parent.parent
TASK = {"name": "arithmetic", "digits": 2, "operators": "+-", "train_size": 20000, "eval_size": 1000}
"""The recipes' task: its held-out split's first 300 problems are the SFT run's held-out set."""
PAIRED = ("dpo", "ipo", "simpo", "robust_dpo", "hinge", "nca", "exo", "apo_zero", "apo_down", "aot", "sppo_hard", "rpo",
          "dpop", "cpo", "orpo", "cpl")
METHODS = {
    **{name: (f"recipes/arith-self-{name}.yaml", "pairs.jsonl") for name in PAIRED},
    **{name: (f"recipes/arith-self-{name}.yaml", "unpaired.jsonl") for name in ("kto", "bco")},
    **{name: (f"recipes/arith-self-{name}.yaml", "lists.jsonl") for name in ("lipo_lambda", "plackett_luce")},
    "online_dpo": ("recipes/arith-online_dpo.yaml", None),
    "selm": ("recipes/arith-selm.yaml", None),
    "rso": ("recipes/arith-rso.yaml", None),
    "rso_hinge": ("recipes/arith-rso_hinge.yaml", None),
}
DEFAULT_METHODS = ("dpo", "ipo", "simpo", "kto", "online_dpo")
LIST_SIZE = 4
"""Completions per list of lists.jsonl (the listwise presets' K)."""


def sft_dir(seed: int) -> Path:
    return ROOT / ("runs/arith-sft" if seed == 0 else f"runs/arith-sft-s{seed}")


def ensure_sft(seed: int) -> Path:
    final = sft_dir(seed) / "final"
    if not (final / "config.json").is_file():
        sft(str(ROOT / "recipes/arith-sft.yaml"), overrides=[f"seed={seed}", f"output_dir={sft_dir(seed)}"])
    return final


@torch.inference_mode()
def build_preference_set(model_dir: Path, out_dir: Path, *, seed: int, prompts: int, samples: int) -> dict:
    """Sample the model on training prompts, judge with numeric_match, write pairs.jsonl / unpaired.jsonl."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(model_dir).eval(), load_tokenizer(model_dir)
    task = ArithmeticTask(digits=TASK["digits"], operators=TASK["operators"])
    rows = task.sample(TASK["train_size"], seed=seed, split="train")[:prompts]  # the SFT run's training problems
    prompt_ids = [tokenizer(r["prompt"]).input_ids for r in rows]
    stop, engine, k = (tokenizer.eos_token_id,), ENGINES["native"], samples - 1
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=stop)
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, stop_token_ids=stop)
    first = engine.generate(model, prompt_ids, greedy, n=1).completion_ids
    generator = torch.Generator().manual_seed(seed)
    rest = engine.generate(model, prompt_ids, sampled, n=k, generator=generator).completion_ids
    ids = [c for i in range(len(rows)) for c in [first[i], *rest[i * k : (i + 1) * k]]]  # greedy first
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    answers = [r["answer"] for r in rows for _ in range(samples)]
    scores = load_reward_fn("numeric_match")(completions=texts, answer=answers)
    scores_P_K = torch.tensor(scores, dtype=torch.float32).view(len(rows), samples)
    pairs, unpaired = [], []
    for p, i, j in best_vs_worst(scores_P_K).tolist():
        chosen, rejected = texts[p * samples + i], texts[p * samples + j]
        if not chosen.strip() or not rejected.strip():  # an empty answer (EOS first) is no text row
            continue
        pairs.append({"prompt": rows[p]["prompt"], "chosen": chosen, "rejected": rejected})
        unpaired += [{"prompt": rows[p]["prompt"], "completion": chosen, "label": True},
                     {"prompt": rows[p]["prompt"], "completion": rejected, "label": False}]  # fmt: skip
    lists = graded_lists(rows, texts, scores_P_K, samples)
    for name, data in (("pairs.jsonl", pairs), ("unpaired.jsonl", unpaired), ("lists.jsonl", lists)):
        (out_dir / name).write_text("".join(json.dumps(r) + "\n" for r in data))
    stats = {"prompts": len(rows), "samples": samples, "sample_accuracy": scores_P_K.mean().item(), "pairs": len(pairs),
             "lists": len(lists)}
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=1))
    return stats


def graded_lists(rows: list[dict], texts: list[str], scores_P_K: torch.Tensor, samples: int) -> list[dict]:
    """Each prompt's first LIST_SIZE distinct non-empty answers, graded by their distance to the right answer,
    kept when a right and a wrong one are among them."""
    from posttrain.rewards.verifiers import extract_final_fraction

    lists = []
    for p, row in enumerate(rows):
        seen: dict[str, float] = {}
        for i in range(samples):
            text = texts[p * samples + i]
            if text.strip() and text not in seen and len(seen) < LIST_SIZE:
                value = extract_final_fraction(text)
                right = scores_P_K[p, i].item() >= 1.0
                seen[text] = 0.0 if right else -100.0 if value is None else -float(abs(value - int(row["answer"])))
        grades = list(seen.values())
        if len(grades) == LIST_SIZE and max(grades) == 0.0 and min(grades) < 0.0:
            lists.append({"prompt": row["prompt"], "completions": list(seen), "scores": grades})
    return lists


def greedy_accuracy(model_dir: Path, seed: int, out_dir: Path) -> float:
    config = {"model": {"path": str(model_dir)}, "data": {"task": TASK}, "eval": {"max_new_tokens": 8},
              "output_dir": str(out_dir), "seed": seed}  # fmt: skip
    return evaluate(config).greedy_accuracy


def run_method(method: str, seed: int, model_dir: Path, set_dir: Path, out_dir: Path) -> dict:
    recipe, data = METHODS[method]
    overrides = [f"model.path={model_dir}", f"seed={seed}", f"output_dir={out_dir}"]
    if data is not None:
        overrides.append(f"data.train={set_dir / data}")
    started = time.perf_counter()
    result = pref(str(ROOT / recipe), overrides=overrides, progress=False)
    return {"accuracy": result.final_eval["eval_accuracy"], "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
    parser.add_argument("--prompts", type=int, default=20000, help="training prompts sampled for the set")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt for the set")
    parser.add_argument("--out", default=str(ROOT / "bench/preference_demo.json"))
    args = parser.parse_args()
    results = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    for seed in args.seeds:
        entry = results.setdefault(str(seed), {})
        model_dir = ensure_sft(seed)
        set_dir = sft_dir(seed) / "self-prefs"
        entry["set"] = build_preference_set(model_dir, set_dir, seed=seed, prompts=args.prompts, samples=args.samples)
        entry["sft"] = greedy_accuracy(model_dir, seed, ROOT / f"runs/pref-demo/s{seed}/eval-sft")
        print(f"seed {seed}: SFT {entry['sft']:.1%}; set {entry['set']}", flush=True)
        for method in args.methods:
            entry[method] = run_method(method, seed, model_dir, set_dir, ROOT / f"runs/pref-demo/s{seed}/{method}")
            print(f"seed {seed}: {method} {entry[method]['accuracy']:.1%} in {entry[method]['seconds']:.0f} s",
                  flush=True)  # fmt: skip
            Path(args.out).write_text(json.dumps(results, indent=1))
    print(table(results, args.methods))
    from adastop_demos import table as adastop_table  # beside this script: AdaStop on the gains over the seeds

    print(adastop_table())


def table(results: dict, methods: list[str]) -> str:
    """Markdown: held-out greedy accuracy per seed and its mean, with the change from the SFT model."""
    seeds = sorted(results, key=int)
    head = "| method | mean over seeds (change) | " + " | ".join(f"seed {s}" for s in seeds) + " | wall time per run |"
    lines = [head, "|---" * (len(seeds) + 3) + "|"]
    sft = statistics.mean(results[s]["sft"] for s in seeds)
    lines.append(f"| SFT model | {sft:.1%} | " + " | ".join(f"{results[s]['sft']:.1%}" for s in seeds) + " | |")
    for method in methods:
        values = [results[s][method]["accuracy"] for s in seeds]
        cells = [f"{v:.1%} ({v - results[s]['sft']:+.1%})" for v, s in zip(values, seeds, strict=True)]
        mean, seconds = statistics.mean(values), statistics.mean(results[s][method]["seconds"] for s in seeds)
        lines.append(f"| {method} | {mean:.1%} ({mean - sft:+.1%}) | " + " | ".join(cells) + f" | {seconds:.0f} s |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
