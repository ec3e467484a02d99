"""Where a posttrain GRPO step's time goes, and how close the training step is to the machine's peak.

Runs the real `train_rl` (as `bench/grpo_step.py` does) with timers around the parts it calls:

- generation: the rollout engine's `generate` (prefill + decode);
- old/ref log-probs: `token_logprobs` called without gradient (the reference forward; old log-probs come
  from sampling when the update is on-policy, so there is no separate old-policy forward);
- reward: `RewardSet.score`;
- policy forward: `token_logprobs` with gradient; backward: `Tensor.backward`;
- optimiser: gradient clipping and `Optimizer.step`;
- other: the rest of the step (padding, advantages, metrics, logging).

FLOPs are counted from the real token counts of each step (2 per weight per token, the LM head only where
log-probs are needed, attention over the causal context; backward = 2 x forward) and divided by the
measured matmul peak (`bench/matmul_peak.py`), measured in the same worker with the same threads.

    python bench/profile_grpo.py --sizes tiny,30m
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_step
import harness
from matmul_peak import measure_peak

PARTS = ("generation", "old/ref log-probs", "reward", "policy forward", "backward", "optimiser", "other")


class Timers:
    """Intervals (start, seconds) per part, and per-call FLOP counts, over the whole run."""

    def __init__(self) -> None:
        self.spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.flops: dict[str, list[tuple[float, float]]] = defaultdict(list)

    def wrap(self, part: str, fn: Any, flops: Any = None) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.time()
            out = fn(*args, **kwargs)
            self.spans[part].append((start, time.time() - start))
            if flops is not None:
                self.flops[part].append((start, flops(args, kwargs, out)))
            return out

        return timed


def run_profile(case: dict[str, Any]) -> dict[str, Any]:
    import importlib
    import pkgutil

    import torch

    import posttrain.policies
    import posttrain.runtime.guards
    import posttrain.trainers
    from posttrain import api
    from posttrain.rewards.scoring import RewardSet
    from posttrain.rollout import ENGINES
    from posttrain.runtime.logging import read_metrics

    peak = measure_peak(case["device"], seconds=1.0, dtype=case.get("dtype", "float32"))["peak"]
    tokenizer = harness.build_tokenizer()
    model = harness.case_model(case, tokenizer)
    config = model.config
    rows = harness.arithmetic_rows(4096, seed=case["seed"], prompt_tokens=case.get("prompt_tokens", 0))
    timers = Timers()

    def generation_flops(args: Any, kwargs: Any, out: Any) -> float:
        flops = 0.0
        for i, completion in enumerate(out.completion_ids):
            prompt = len(out.prompt_ids[i // out.group_size])
            decoded = max(0, len(completion) - 1)  # the first token comes from the prefill's logits
            flops += harness.forward_flops(config, decoded, sum(prompt + j for j in range(1, decoded + 1)), decoded)
        for prompt_ids in out.prompt_ids:  # one shared prefill per prompt, head at the last position only
            n = len(prompt_ids)
            flops += harness.forward_flops(config, n, n * (n + 1) / 2, 1)
        return flops

    def logprob_flops(args: Any, kwargs: Any, out: Any) -> float:
        attention_mask_B_T, target_mask_B_T = args[2], args[3]
        lengths = attention_mask_B_T.sum(dim=1).tolist()
        return harness.forward_flops(
            config, int(sum(lengths)), sum(n * (n + 1) / 2 for n in lengths), int(target_mask_B_T[:, 1:].sum())
        )

    engine = ENGINES["native"]
    engine.generate = timers.wrap("generation", engine.generate, generation_flops)  # instance attribute
    RewardSet.score = timers.wrap("reward", RewardSet.score)
    original_token_logprobs = posttrain.policies.token_logprobs
    no_grad_lp = timers.wrap("old/ref log-probs", original_token_logprobs, logprob_flops)
    grad_lp = timers.wrap("policy forward", original_token_logprobs, lambda a, k, o: 3 * logprob_flops(a, k, o))

    def token_logprobs(*args: Any, **kwargs: Any) -> Any:
        return (grad_lp if torch.is_grad_enabled() else no_grad_lp)(*args, **kwargs)

    # wherever a trainer module imported `token_logprobs`, it now goes through the timers
    for info in pkgutil.iter_modules(posttrain.trainers.__path__):
        module = importlib.import_module(f"posttrain.trainers.{info.name}")
        if getattr(module, "token_logprobs", None) is original_token_logprobs:
            module.token_logprobs = token_logprobs
    torch.Tensor.backward = timers.wrap("backward", torch.Tensor.backward)
    guards = posttrain.runtime.guards
    guards.total_norm = timers.wrap("optimiser", guards.total_norm)  # the gradient norm the clipping reads
    torch.optim.AdamW.step = timers.wrap("optimiser", torch.optim.AdamW.step)

    weights, autocast = harness.precision(case)
    with tempfile.TemporaryDirectory() as out:
        config_dict = {
            "model": {"preset": harness.SIZES[case["size"]], "tokenizer": "arithmetic", **weights},
            "data": {},
            "train": {"max_steps": case["warmup"] + case["steps"], "lr": case["lr"], **autocast},
            "rl": {
                "prompts_per_step": case["prompts"], "group_size": case["group"],
                "sampling": {"max_new_tokens": case["completion"], "temperature": case["temperature"]},
                "kl": {"coef": case["beta"]},
            },
            "output_dir": out, "seed": case["seed"], "device": case["device"],
        }  # fmt: skip
        api.rl(config_dict, model=model, tokenizer=tokenizer, train=rows, rewards=[harness.arithmetic_reward],
               progress=False)  # fmt: skip
        stamps = [r["time"] for r in read_metrics(out) if r.get("kind") == "train"]

    steps = []
    for i in range(case["warmup"], len(stamps)):
        lo, hi = stamps[i - 1], stamps[i]
        parts = {p: sum(s for t, s in timers.spans[p] if lo <= t < hi) for p in PARTS if p != "other"}
        parts["other"] = (hi - lo) - sum(parts.values())
        flops = {p: sum(f for t, f in timers.flops[p] if lo <= t < hi) for p in timers.flops}
        steps.append({"step_s": hi - lo, "parts": parts, "flops": flops})
    median = {p: statistics.median(s["parts"][p] for s in steps) for p in PARTS}
    flops = {p: statistics.median(s["flops"].get(p, 0.0) for s in steps) for p in timers.flops}
    step_s = statistics.median(s["step_s"] for s in steps)
    train_s = median["policy forward"] + median["backward"]
    total_flops = sum(flops.values())
    return {
        "values": [s["step_s"] for s in steps],
        "base_mb": harness.rss_mb(),
        "peak_gflops": peak / 1e9,
        "parts_s": median,
        "flops": flops,
        "train_flops_per_s": flops.get("policy forward", 0.0) / train_s if train_s else float("nan"),
        "train_fraction_of_peak": flops.get("policy forward", 0.0) / train_s / peak if train_s else float("nan"),
        "floor_s": total_flops / peak,
        "step_over_floor": step_s / (total_flops / peak),
    }


SIDES = {"posttrain": run_profile}


def report(size: str, case: dict[str, Any], r: harness.Run) -> str:
    step = statistics.median(r.values)
    lines = [f"### GRPO step profile, {size} ({harness.SIZES[size]})", "",
             f"P={case['prompts']} prompts x G={case['group']} x L={case['completion']} tokens, beta={case['beta']}; "
             f"median step {step * 1000:.0f} ms over {len(r.values)} steps; foreign load "
             f"{r.foreign_load if r.foreign_load is None else round(r.foreign_load, 2)}.", "",
             "| part | median ms | share | GFLOP | achieved GFLOP/s | of peak |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    peak = r.extra["peak_gflops"]
    for part in PARTS:
        seconds = r.extra["parts_s"][part]
        gflop = r.extra["flops"].get(part, 0.0) / 1e9
        if part == "policy forward":  # forward + backward FLOPs are attributed to the two parts together
            seconds_fb = seconds + r.extra["parts_s"]["backward"]
            rate = gflop / seconds_fb if seconds_fb else float("nan")
            lines.append(f"| policy forward + backward | {seconds_fb * 1000:.1f} | {seconds_fb / step:.0%} | "
                         f"{gflop:.2f} | {rate:.1f} | {rate / peak:.0%} |")  # fmt: skip
            continue
        if part == "backward":
            continue
        rate = gflop / seconds if gflop and seconds else float("nan")
        rate_cell = f"{rate:.1f} | {rate / peak:.0%}" if gflop else "- | -"
        gflop_cell = f"{gflop:.2f}" if gflop else "-"
        lines.append(f"| {part} | {seconds * 1000:.1f} | {seconds / step:.0%} | {gflop_cell} | {rate_cell} |")
    lines += [
        "",
        f"Backward alone: {r.extra['parts_s']['backward'] * 1000:.1f} ms. Measured matmul peak in the same worker: "
        f"{peak:.1f} GFLOP/s. Training step (policy forward + backward) at "
        f"{r.extra['train_fraction_of_peak']:.0%} of peak. Whole step: FLOP floor "
        f"{r.extra['floor_s'] * 1000:.0f} ms, measured {step * 1000:.0f} ms = "
        f"{r.extra['step_over_floor']:.2f}x the floor.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--completion", type=int, default=32)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--prompt-tokens", type=int, default=0, help="lengthen every prompt to about this many tokens")
    args = p.parse_args()
    if args.worker:
        return harness.worker_main(args.worker, SIDES)
    sections, results = [], {}
    for size in harness.sizes_of(args):
        steps = 2 if args.quick else args.steps or grpo_step.DEFAULTS[size]["steps"]
        case = grpo_step.grpo_case(size, prompts=args.prompts, group=args.group, completion=args.completion,
                                   beta=args.beta, steps=steps, warmup=args.warmup, device=args.device,
                                   dtype=harness.dtype_of(args), prompt_tokens=args.prompt_tokens)  # fmt: skip
        run = harness.run_worker(__file__, "posttrain", case, args.threads)
        sections.append(report(size, case, run))
        results[size] = {"case": case, "values": run.values, "foreign_load": run.foreign_load, **run.extra}
    text = "\n".join(sections)
    print(text)
    out = args.json or harness.OUT_DIR / "profile_grpo.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    import json

    out.write_text(json.dumps({"command": harness.command_line(), "machine": harness.machine(), "markdown": text,
                               "results": results}, indent=1))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
