"""vLLM as a peer: generation tokens/s of vLLM's CPU build, the native engine and transformers `generate` (issue #28.2).

Run it in the vLLM environment (`make vllm-venv`; `make bench-vllm` runs the default cases):

    .venv-vllm/bin/python bench/vllm_peer.py --sizes tiny,30m

The three sides sample G completions for each of P arithmetic prompts with the same float32 model (the same
weights, built from the preset with the same seed): temperature 1, no top-k / top-p, exactly L new tokens per
completion (no stop token on any side). `native` and `vllm` are called through the engine protocol
(`ENGINES["native"]`, `VLLMEngine`: what `rl.engine` selects); `generate` as bench/generation.py calls it (TRL's
non-vLLM path). Each side runs in its own fresh process with the same torch threads, sides alternating. Rates are
warm (after `--warmup` untimed calls); vLLM's start-up (building its `LLM` and pushing the weights) is measured
once per worker and reported on its own, and so is one later push of the weights with its probe check (`SYNCS`
of them, the median), the cost an RL step through `rl.engine: vllm` adds to its sampling.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
from generation import _setup, _timed, run_generate, run_native

DEFAULTS = {"tiny": {"steps": 5}, "30m": {"steps": 3}, "0.5b": {"steps": 2}}
SYNCS = 3
"""Weight pushes timed after the generation calls, on the vLLM side."""


def run_vllm(case: dict[str, Any]) -> dict[str, Any]:
    import torch

    from posttrain.rollout import SamplingParams
    from posttrain.rollout.vllm import VLLMEngine

    _, model, prompt_ids = _setup(case)
    params = SamplingParams(max_new_tokens=case["completion"], temperature=1.0)
    generator = torch.Generator(device=model.device).manual_seed(case["seed"])
    base = harness.base_memory_mb(case["device"])
    started = time.perf_counter()
    engine = VLLMEngine(max_model_len=case["max_model_len"])
    engine.sync_weights(model)
    startup_s = time.perf_counter() - started

    def generate() -> int:
        out = engine.generate(model, prompt_ids, params, n=case["group"], generator=generator)
        return sum(len(c) for c in out.completion_ids)

    timed = _timed(case, generate)
    syncs = [engine.sync_weights(model)["sync/s"] for _ in range(SYNCS)]  # what every RL step adds: push + check
    return {**timed, "base_mb": base, "startup_s": startup_s, "sync_s": statistics.median(syncs),
            "threads": torch.get_num_threads()}  # fmt: skip


SIDES = {"native": run_native, "generate": run_generate, "vllm": run_vllm}


def main() -> None:
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--completion", type=int, default=32)
    p.add_argument("--sides", default="native,vllm,generate", help="comma-separated: native, vllm, generate")
    p.add_argument(
        "--retries",
        type=int,
        default=harness.RETRIES,
        help="re-runs of a worker that ran beside other processes' load (each vLLM one starts vLLM again)",
    )
    args = p.parse_args()
    if args.worker:
        return harness.worker_main(args.worker, SIDES)
    sides_run = [s.strip() for s in args.sides.split(",") if s.strip()]
    rounds = 1 if args.quick else args.rounds
    cases = []
    for size in harness.sizes_of(args):
        steps = 2 if args.quick else args.steps or DEFAULTS[size]["steps"]
        case = {
            "size": size, "prompts": args.prompts, "group": args.group, "completion": args.completion,
            "stop_at_eos": False, "steps": steps, "warmup": args.warmup, "device": args.device,
            "dtype": harness.dtype_of(args), "prompt_tokens": 0, "seed": 0, "max_model_len": 256,
        }  # fmt: skip
        print(f"vLLM peer, {size}: {case}", flush=True)
        sides = harness.alternate(__file__, case, sides_run, rounds=rounds, threads=args.threads, retries=args.retries)
        shape = f"{args.prompts} prompts x {args.group} samples x {args.completion} tokens, {args.threads} threads"
        if "native" in sides and "vllm" in sides:
            vllm = sides["vllm"].extra
            notes = [
                shape,
                f"vLLM start-up (LLM built, weights pushed and verified), median over workers: "
                f"{vllm['startup_s']:.1f} s; a later push + probe check (what every RL step adds): "
                f"{vllm['sync_s'] * 1000:.0f} ms; torch threads in the vLLM worker: {vllm['threads']}",
            ]
            cases.append(
                harness.CaseResult(
                    "Generation tokens/s vs vllm",
                    size,
                    case,
                    "tokens/s",
                    sides,
                    baseline="vllm",
                    ours="native",
                    notes=notes,
                )
            )
        if "native" in sides and "generate" in sides:
            cases.append(
                harness.CaseResult(
                    "Generation tokens/s vs generate",
                    size,
                    case,
                    "tokens/s",
                    sides,
                    baseline="generate",
                    ours="native",
                    notes=[shape],
                )
            )
    harness.print_cases(cases)
    print(f"wrote {harness.write_json(args.json, __file__, cases)}")


if __name__ == "__main__":
    main()
