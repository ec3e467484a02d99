"""GRPO step: posttrain's `train_rl` against TRL's `GRPOTrainer` on identical settings (issue #7).

Both sides get the same float32 model (same preset, same seed, same weights), the same arithmetic
tokenizer and prompts, and the same reward function, and do the same work per step: P prompts x G
sampled completions of at most L tokens (temperature 1, no top-k/top-p), one reward call, group-normalised
advantages, a KL term to the initial policy with coefficient beta (k3, in the loss; beta > 0 means a
reference forward on both sides), one epoch and one optimiser step (AdamW, clip 0.2, grad-norm 1.0,
token-mean loss). TRL runs its default non-vLLM path (`model.generate`) with the settings a competent user
picks on a CPU: gradient_checkpointing=False and bf16=False (TRL defaults both to True).

A step is timed end to end (generation, scoring, reference log-probs, forward, backward, optimiser,
logging): from the end of one step to the end of the next. `--families` runs the tiny step once per model family
(its `<family>-small` preset, the demo model's shape), each side by side with TRL, and reports which forward
posttrain ran (`describe_forward_path`).

    python bench/grpo_step.py --sizes tiny,30m
    python bench/grpo_step.py --families llama,mistral,qwen2,qwen3,gemma,gemma2,gemma3,phi3,olmo2
    python bench/grpo_step.py --quick
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

DEFAULTS = {"tiny": {"steps": 6}, "30m": {"steps": 3}, "0.5b": {"steps": 3}}


def grpo_case(size: str, *, prompts: int = 8, group: int = 8, completion: int = 32, beta: float = 0.04,
              steps: int = 5, warmup: int = 1, device: str = "cpu", dtype: str = "float32",
              prompt_tokens: int = 0, micro_batch: int | None = None, seed: int = 0,
              family: str | None = None) -> dict[str, Any]:  # fmt: skip
    if micro_batch is not None and (prompts * group) % micro_batch:
        raise SystemExit(f"--micro-batch {micro_batch} must divide the step's {prompts * group} sequences")
    return {
        "size": size, "prompts": prompts, "group": group, "completion": completion, "beta": beta, "lr": 1e-5,
        "temperature": 1.0, "steps": steps, "warmup": warmup, "device": device, "dtype": dtype,
        "prompt_tokens": prompt_tokens, "micro_batch": micro_batch, "seed": seed, "family": family,
    }  # fmt: skip


def rows_per_step(case: dict[str, Any]) -> int:
    return case["prompts"] * case["group"]


def step_flops(
    case: dict[str, Any], config: Any, tokenizer: Any, rows: list[dict[str, str]], completion: float,
    *, shared: bool = False,
) -> float:
    """The step's minimal FLOPs at the data's mean prompt length and the measured mean completion length;
    `shared`: each prompt computed once per group in training (`harness.grpo_flops`)."""
    mean_prompt = statistics.mean(len(tokenizer(r["prompt"])["input_ids"]) for r in rows[:256])
    prompts = [round(mean_prompt)] * case["prompts"]
    return harness.grpo_flops(config, prompts, case["group"], completion, case["beta"], shared=shared)


def run_posttrain(case: dict[str, Any]) -> dict[str, Any]:
    from posttrain import api
    from posttrain.policies import describe_forward_path

    tokenizer = harness.build_tokenizer()
    model = harness.case_model(case, tokenizer)
    path = describe_forward_path(model)
    rows = harness.arithmetic_rows(4096, seed=case["seed"], prompt_tokens=case.get("prompt_tokens", 0))
    base = harness.base_memory_mb(case["device"])
    clock = harness.StepClock()
    clock.watch_posttrain()
    weights, autocast = harness.precision(case)
    with tempfile.TemporaryDirectory() as out:
        config = {
            "model": {"preset": harness.preset_of(case["size"], case.get("family")), "tokenizer": "arithmetic",
                      **weights},
            "data": {},
            "train": {"max_steps": case["warmup"] + case["steps"], "lr": case["lr"], "max_grad_norm": 1.0,
                      **autocast},
            "rl": {
                "prompts_per_step": case["prompts"], "group_size": case["group"], "epochs": 1, "minibatches": 1,
                "micro_batch_size": case.get("micro_batch"),
                "advantage": "grpo", "policy_loss": "ppo", "policy_loss_args": {"clip_low": 0.2, "clip_high": 0.2},
                "loss_aggregation": "token_mean",
                "sampling": {"max_new_tokens": case["completion"], "temperature": case["temperature"]},
                "kl": {"coef": case["beta"], "estimator": "k3", "in_reward": False},
            },
            "output_dir": out, "seed": case["seed"], "device": case["device"],
        }  # fmt: skip
        result = api.rl(config, model=model, tokenizer=tokenizer, train=rows,
                        rewards=[harness.arithmetic_reward], progress=False)  # fmt: skip
    measured = result.history[case["warmup"] :]
    completion = statistics.mean(h["completion_length"] for h in measured)
    return {
        **clock.report(case["warmup"]),
        "base_mb": base,
        "flops": step_flops(case, model.config, tokenizer, rows, completion),
        "flops_shared_prompt": step_flops(case, model.config, tokenizer, rows, completion, shared=True),
        "completion_tokens": rows_per_step(case) * completion,
        "gen_s": statistics.median(h["gen_s"] for h in measured),
        "train_s": statistics.median(h["train_s"] for h in measured),
        "params": harness.param_count(model),
        "path": path,
    }


def run_trl(case: dict[str, Any]) -> dict[str, Any]:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = harness.build_tokenizer()
    rows = harness.arithmetic_rows(4096, seed=case["seed"], prompt_tokens=case.get("prompt_tokens", 0))
    clock = harness.StepClock()

    with tempfile.TemporaryDirectory() as out:
        path = harness.save_model(case["size"], tokenizer, Path(out) / "model", seed=case["seed"],
                                  family=case.get("family"))  # fmt: skip
        sequences = rows_per_step(case)
        micro_batch = case.get("micro_batch") or sequences
        args = GRPOConfig(
            **{**harness.trl_args(case, out, lr=case["lr"]), "gradient_accumulation_steps": sequences // micro_batch},
            # one generation batch of P x G per optimiser step, its forward and backward in micro-batches
            per_device_train_batch_size=micro_batch,
            num_generations=case["group"],
            max_completion_length=case["completion"],
            temperature=case["temperature"], top_p=1.0, top_k=0,
            beta=case["beta"], num_iterations=1, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        )  # fmt: skip
        trainer = GRPOTrainer(
            model=path,
            reward_funcs=harness.arithmetic_reward,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[clock.trainer_callback()],
        )
        base = harness.base_memory_mb(case["device"])
        trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h][case["warmup"] :]
    completion = statistics.mean(h["completions/mean_length"] for h in logs)
    return {
        **clock.report(case["warmup"]),
        "base_mb": base,
        "flops": step_flops(case, trainer.model.config, tokenizer, rows, completion),
        "completion_tokens": rows_per_step(case) * completion,
        "params": harness.param_count(trainer.model),
    }


SIDES = {"posttrain": run_posttrain, "trl": run_trl}


def main() -> None:
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=8, help="prompts per step (P)")
    p.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--completion", type=int, default=32, help="max completion tokens (L)")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (> 0: both sides run a reference)")
    p.add_argument("--prompt-tokens", type=int, default=0, help="lengthen every prompt to about this many tokens")
    p.add_argument("--families", default=None,
                   help="comma-separated model families: the tiny step once per family's preset (<family>-small)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="sequences per forward + backward on both sides (posttrain rl.micro_batch_size; TRL "
                        "per_device_train_batch_size with gradient accumulation); None: the whole step")  # fmt: skip
    args = p.parse_args()
    if args.worker:
        return harness.worker_main(args.worker, SIDES)
    rounds = 1 if args.quick else args.rounds
    cases = []
    runs = [(size, None) for size in harness.sizes_of(args)] if args.families is None else [
        ("tiny", family.strip()) for family in args.families.split(",") if family.strip()
    ]  # fmt: skip
    for size, family in runs:
        steps = 2 if args.quick else args.steps or DEFAULTS[size]["steps"]
        case = grpo_case(size, prompts=args.prompts, group=args.group, completion=args.completion, beta=args.beta,
                         steps=steps, warmup=args.warmup, device=args.device, dtype=harness.dtype_of(args),
                         prompt_tokens=args.prompt_tokens, micro_batch=args.micro_batch, family=family)  # fmt: skip
        print(f"GRPO step, {size}: {case}", flush=True)
        sides = harness.alternate(__file__, case, ["posttrain", "trl"], rounds=rounds, threads=args.threads,
                                  retries=args.retries)
        ours = sides["posttrain"].extra
        cases.append(
            harness.CaseResult(
                "GRPO step" if family is None else f"GRPO step, {family}", size, case, "s", sides,
                notes=[f"completion tokens per step: posttrain {ours['completion_tokens']:.0f}, "
                       f"TRL {sides['trl'].extra['completion_tokens']:.0f} (sampling stops at EOS on both sides); "
                       f"{ours['path']}"],
            )
        )  # fmt: skip
    harness.print_cases(cases)
    print(f"wrote {harness.write_json(args.json, __file__, cases)}")


if __name__ == "__main__":
    main()
