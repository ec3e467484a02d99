"""SFT throughput: posttrain's `train_sft` against TRL's `SFTTrainer`, tokens per second (issue #7).

Both sides get the same float32 model and tokenizer and the same prompt/completion rows (2-digit
arithmetic, as in `posttrain demo`), completion-only loss, EOS appended to the completion by both, AdamW
with a constant learning rate and grad-norm 1.0; TRL with gradient_checkpointing=False and bf16=False.

- without packing: B examples per step, padded to the longest (TRL's default collator; posttrain buckets
  the step's examples by length, here one micro-batch);
- with packing: posttrain packs each step's B examples into rows of `--max-length` (best-fit decreasing,
  position ids restart per document); TRL packs the dataset into rows of the same length and takes
  about as many tokens per step. TRL is run with both of its packing strategies, `bfd` (padding-free,
  position ids) and `wrapped`, and the faster one is the baseline.

Tokens per second count every real (non-padding) token of the step, prompt and completion.

    python bench/sft.py --sizes tiny,30m
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

DEFAULTS = {"tiny": {"steps": 15}, "30m": {"steps": 5}, "0.5b": {"steps": 5}}


def example_tokens(rows: list[dict[str, str]]) -> float:
    """Mean tokens of prompt + completion + EOS, as both sides tokenise them."""
    tokenizer = harness.build_tokenizer()
    return statistics.mean(
        len(tokenizer(r["prompt"])["input_ids"]) + len(tokenizer(r["completion"])["input_ids"]) + 1 for r in rows
    )


def step_flops(case: dict[str, Any], config: Any, rows: list[dict[str, str]]) -> float:
    """Forward and backward over B examples (the head at completion tokens only), averaged over the data."""
    tokenizer = harness.build_tokenizer()
    lengths, heads = [], []
    for r in rows:
        completion = len(tokenizer(r["completion"])["input_ids"]) + 1
        lengths.append(len(tokenizer(r["prompt"])["input_ids"]) + completion)
        heads.append(completion)
    return harness.sequence_flops(config, lengths, heads, backward=True) * case["batch"] / len(rows)


def sft_rows(case: dict[str, Any]) -> list[dict[str, str]]:
    rows = harness.arithmetic_rows(case["batch"] * (case["warmup"] + case["steps"]), seed=case["seed"])
    return [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]


def run_posttrain(case: dict[str, Any]) -> dict[str, Any]:
    from posttrain import api

    tokenizer = harness.build_tokenizer()
    model = harness.case_model(case, tokenizer)
    weights, autocast = harness.precision(case)
    rows = sft_rows(case)
    per_step = case["batch"] * example_tokens(rows)
    base = harness.base_memory_mb(case["device"])
    clock = harness.StepClock()
    clock.watch_posttrain()
    with tempfile.TemporaryDirectory() as out:
        config = {
            "model": {"preset": harness.SIZES[case["size"]], "tokenizer": "arithmetic", **weights},
            "data": {"max_length": case["max_length"], "packing": bool(case["packing"]),
                     "completion_only": True},
            "train": {"max_steps": case["warmup"] + case["steps"], "batch_size": case["batch"], "lr": 1e-4,
                      "warmup_steps": 0, "schedule": "constant", "max_grad_norm": 1.0, **autocast},
            "output_dir": out, "seed": case["seed"], "device": case["device"],
        }  # fmt: skip
        api.sft(config, model=model, tokenizer=tokenizer, train=rows, progress=False)
    return {
        **clock.report(case["warmup"], per_step),
        "base_mb": base,
        "tokens_per_step": per_step,
        "flops": step_flops(case, model.config, rows),
    }


def run_trl(case: dict[str, Any]) -> dict[str, Any]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer = harness.build_tokenizer()
    rows = sft_rows(case)
    per_example = example_tokens(rows)
    packing = case["packing"]  # None, "bfd" or "wrapped"
    # packed rows per step ~ the same number of tokens per step as posttrain's B examples
    batch = max(1, round(case["batch"] * per_example / case["max_length"])) if packing else case["batch"]
    clock = harness.StepClock()

    with tempfile.TemporaryDirectory() as out:
        path = harness.save_model(case["size"], tokenizer, Path(out) / "model", seed=case["seed"])
        args = SFTConfig(
            **harness.trl_args(case, out, lr=1e-4),
            per_device_train_batch_size=batch,
            max_length=case["max_length"], packing=packing is not None, packing_strategy=packing or "bfd",
            completion_only_loss=True,
        )  # fmt: skip
        # packed rows are drawn without repetition: make sure there are enough of them for every step
        repeat = 1 + int(batch * (case["warmup"] + case["steps"]) * case["max_length"] / (len(rows) * per_example))
        trainer = SFTTrainer(
            model=path,
            args=args,
            train_dataset=Dataset.from_list(rows * (repeat if packing else 1)),
            processing_class=tokenizer,
            callbacks=[clock.trainer_callback()],
        )
        if packing:
            lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
            per_step = batch * statistics.mean(lengths)
        else:
            per_step = batch * per_example
        base = harness.base_memory_mb(case["device"])
        trainer.train()
    return {
        **clock.report(case["warmup"], per_step),
        "base_mb": base,
        "tokens_per_step": per_step,
        "rows_per_step": batch,
    }


SIDES = {
    "posttrain": run_posttrain,
    "trl": run_trl,
    "trl-bfd": lambda case: run_trl({**case, "packing": "bfd"}),
    "trl-wrapped": lambda case: run_trl({**case, "packing": "wrapped"}),
}


def main() -> None:
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64, help="examples per optimiser step (posttrain)")
    p.add_argument("--max-length", type=int, default=128, help="packed row length (and truncation length)")
    p.add_argument("--packing", default="off,on", help="cases: off, on")
    args = p.parse_args()
    if args.worker:
        return harness.worker_main(args.worker, SIDES)
    rounds = 1 if args.quick else args.rounds
    cases = []
    for size in harness.sizes_of(args):
        steps = 3 if args.quick else args.steps or DEFAULTS[size]["steps"]
        base = {"size": size, "batch": args.batch, "max_length": args.max_length, "steps": steps,
                "warmup": args.warmup, "device": args.device, "dtype": harness.dtype_of(args), "seed": 0}  # fmt: skip
        for mode in [m.strip() for m in args.packing.split(",")]:
            if mode == "off":
                case = {**base, "packing": None}
                print(f"SFT without packing, {size}: {case}", flush=True)
                sides = harness.alternate(__file__, case, ["posttrain", "trl"], rounds=rounds, threads=args.threads)
                cases.append(harness.CaseResult("SFT tokens/s, no packing", size, case, "tokens/s", sides))
                continue
            case = {**base, "packing": "on"}
            print(f"SFT with packing, {size}: {case}", flush=True)
            sides = harness.alternate(
                __file__, case, ["posttrain", "trl-bfd", "trl-wrapped"], rounds=rounds, threads=args.threads
            )
            best = max(("trl-bfd", "trl-wrapped"), key=lambda s: sides[s].median)
            other = "trl-wrapped" if best == "trl-bfd" else "trl-bfd"
            note = (f"TRL's faster packing strategy here: {best} ({sides[best].median:,.0f} tokens/s; "
                    f"{other}: {sides[other].median:,.0f} tokens/s); posttrain packs each step's "
                    f"{args.batch} examples into rows of {args.max_length}, TRL takes "
                    f"{sides[best].extra['rows_per_step']} packed rows of {args.max_length} per step")  # fmt: skip
            cases.append(harness.CaseResult("SFT tokens/s, packing", size, case, "tokens/s", sides, baseline=best,
                                            notes=[note]))  # fmt: skip
    harness.print_cases(cases)
    print(f"wrote {harness.write_json(args.json, __file__, cases)}")


if __name__ == "__main__":
    main()
