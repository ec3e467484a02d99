"""DPO step: posttrain's `train_pref` against TRL's `DPOTrainer` on identical settings (issue #7).

Both sides get the same float32 model and tokenizer, the same preference pairs (2-digit arithmetic: the
correct answer against a one-digit slip, EOS appended to each completion by both), the same batch of N
pairs per optimiser step, sigmoid DPO with the same beta, AdamW with a constant learning rate and
grad-norm 1.0, and no truncation. TRL uses gradient_checkpointing=False and bf16=False (its defaults are
True). Three cases, for where the reference log-probs come from:

- default: each side's default way: posttrain precomputes them once before training
  (`pref.reference: precomputed`), TRL runs the reference model every step (`precompute_ref_log_probs=False`);
- precomputed: both precompute them before training;
- on the fly: both run the reference forward every step.

Precomputation runs before the first step on both sides and is not part of the step time.

    python bench/dpo_step.py --sizes tiny,30m
"""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

DEFAULTS = {"tiny": {"steps": 10}, "30m": {"steps": 4}, "0.5b": {"steps": 4}}
REFERENCES = {
    "default": ("precomputed", False),
    "precomputed": ("precomputed", True),
    "on the fly": ("on_the_fly", False),
}
"""case -> (posttrain pref.reference, TRL precompute_ref_log_probs)."""


def preference_rows(n: int, *, seed: int, completion_tokens: int = 0) -> list[dict[str, str]]:
    """`n` arithmetic pairs; with completion_tokens > 0 both completions continue with that many random
    digits (one token each), for longer sequences."""
    from posttrain.tasks import ArithmeticTask
    from posttrain.tasks.preference_data import preference_pairs

    pairs = preference_pairs(ArithmeticTask(digits=2, operators="+-"), n, seed=seed)
    if completion_tokens:
        rng = random.Random(seed)
        for row in pairs:
            for side in ("chosen", "rejected"):
                row[side] += " " + "".join(rng.choice("0123456789") for _ in range(completion_tokens))
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in pairs]


def run_posttrain(case: dict[str, Any]) -> dict[str, Any]:
    from posttrain import api

    tokenizer = harness.build_tokenizer()
    model = harness.case_model(case, tokenizer)
    weights, autocast = harness.precision(case)
    steps = case["warmup"] + case["steps"]
    rows = preference_rows(case["batch"] * steps, seed=case["seed"], completion_tokens=case["completion_tokens"])
    base = harness.base_memory_mb(case["device"])
    clock = harness.StepClock()
    clock.watch_posttrain()
    with tempfile.TemporaryDirectory() as out:
        config = {
            "model": {"preset": harness.SIZES[case["size"]], "tokenizer": "arithmetic", **weights},
            "data": {"max_length": 4096},
            "train": {"max_steps": steps, "batch_size": case["batch"], "lr": case["lr"], "warmup_steps": 0,
                      "schedule": "constant", "max_grad_norm": 1.0, **autocast},
            "pref": {"loss": "dpo", "loss_args": {"beta": case["beta"]}, "reference": REFERENCES[case["reference"]][0]},
            "output_dir": out, "seed": case["seed"], "device": case["device"],
        }  # fmt: skip
        api.pref(config, model=model, tokenizer=tokenizer, train=rows, progress=False)
    each_step = REFERENCES[case["reference"]][0] == "on_the_fly"
    return {**clock.report(case["warmup"]), "base_mb": base, "tokens_per_pair": _tokens(rows),
            "flops": step_flops(case, model.config, rows, each_step),
            "flops_shared_prompt": step_flops(case, model.config, rows, each_step, shared=True)}  # fmt: skip


def _tokens(rows: list[dict[str, str]]) -> float:
    return sum(_lengths(rows)[0]) / len(rows)


def _lengths(rows: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Every sequence's length (prompt + completion + EOS) and its completion length, chosen and rejected."""
    tokenizer = harness.build_tokenizer()
    lengths, heads = [], []
    for r in rows:
        prompt = len(tokenizer(r["prompt"])["input_ids"])
        for side in ("chosen", "rejected"):
            completion = len(tokenizer(r[side])["input_ids"]) + 1
            lengths.append(prompt + completion)
            heads.append(completion)
    return lengths, heads


def step_flops(
    case: dict[str, Any], config: Any, rows: list[dict[str, str]], reference_each_step: bool, *, shared: bool = False
) -> float:
    """Per step: the policy's forward and backward over the batch's pairs, plus the reference forward when it
    runs every step (averaged over the data set). `shared`: each pair's prompt computed once."""
    lengths, heads = _lengths(rows)
    if shared:
        prompts = [n - c for n, c in zip(lengths[::2], heads[::2])]
        completions = list(zip(heads[::2], heads[1::2]))
        train = harness.shared_prompt_flops(config, prompts, completions, backward=True)
        reference = harness.shared_prompt_flops(config, prompts, completions, backward=False)
    else:
        train = harness.sequence_flops(config, lengths, heads, backward=True)
        reference = harness.sequence_flops(config, lengths, heads, backward=False)
    return (train + (reference if reference_each_step else 0.0)) * case["batch"] / len(rows)


def run_trl(case: dict[str, Any]) -> dict[str, Any]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tokenizer = harness.build_tokenizer()
    steps = case["warmup"] + case["steps"]
    rows = preference_rows(case["batch"] * steps, seed=case["seed"], completion_tokens=case["completion_tokens"])
    clock = harness.StepClock()

    with tempfile.TemporaryDirectory() as out:
        path = harness.save_model(case["size"], tokenizer, Path(out) / "model", seed=case["seed"])
        args = DPOConfig(
            **harness.trl_args(case, out, lr=case["lr"]),
            per_device_train_batch_size=case["batch"],
            beta=case["beta"], loss_type=["sigmoid"], max_length=None,
            precompute_ref_log_probs=REFERENCES[case["reference"]][1],
        )  # fmt: skip
        trainer = DPOTrainer(
            model=path,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[clock.trainer_callback()],
        )
        base = harness.base_memory_mb(case["device"])
        trainer.train()
    each_step = not REFERENCES[case["reference"]][1]
    return {**clock.report(case["warmup"]), "base_mb": base,
            "flops": step_flops(case, trainer.model.config, rows, each_step)}  # fmt: skip


SIDES = {"posttrain": run_posttrain, "trl": run_trl}


def main() -> None:
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32, help="pairs per optimiser step")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--completion-tokens", type=int, default=0, help="extra digits per completion (longer pairs)")
    p.add_argument("--references", default=",".join(REFERENCES), help=f"cases: {', '.join(REFERENCES)}")
    args = p.parse_args()
    if args.worker:
        return harness.worker_main(args.worker, SIDES)
    rounds = 1 if args.quick else args.rounds
    cases = []
    for size in harness.sizes_of(args):
        for reference in [r.strip() for r in args.references.split(",")]:
            steps = 3 if args.quick else args.steps or DEFAULTS[size]["steps"]
            case = {
                "size": size, "batch": args.batch, "beta": args.beta, "lr": 1e-5, "reference": reference,
                "completion_tokens": args.completion_tokens, "steps": steps, "warmup": args.warmup,
                "device": args.device, "dtype": harness.dtype_of(args), "seed": 0,
            }  # fmt: skip
            print(f"DPO step ({reference}), {size}: {case}", flush=True)
            sides = harness.alternate(__file__, case, ["posttrain", "trl"], rounds=rounds, threads=args.threads)
            pt, trl = REFERENCES[reference]
            note = f"reference: posttrain {pt}, TRL {'precomputed' if trl else 'on the fly'}"
            tokens = sides["posttrain"].extra["tokens_per_pair"]
            note += f"; {tokens:.1f} tokens per pair (prompt twice + both completions)"
            cases.append(harness.CaseResult(f"DPO step ({reference})", size, case, "s", sides, notes=[note]))
    harness.print_cases(cases)
    print(f"wrote {harness.write_json(args.json, __file__, cases)}")


if __name__ == "__main__":
    main()
