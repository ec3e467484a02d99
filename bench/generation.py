"""Generation alone: posttrain's native engine against transformers `generate`, tokens per second (issue #7).

Both sides sample G completions for each of P arithmetic prompts with the same float32 model: temperature
1, no top-k / top-p, exactly L new tokens per completion (EOS does not stop either side unless
`--stop-at-eos`, so both produce the same number of tokens). `generate` is called the way TRL's GRPO
trainer calls it on its non-vLLM path: every prompt repeated G times in one left-padded batch,
`do_sample=True`, `top_k=0`. The native engine prefills each prompt once and expands its cache G times.

    python bench/generation.py --sizes tiny,30m
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

DEFAULTS = {"tiny": {"steps": 5}, "30m": {"steps": 2}, "0.5b": {"steps": 3}}


def _setup(case: dict[str, Any]) -> tuple[Any, Any, list[list[int]]]:
    import torch

    tokenizer = harness.build_tokenizer()
    model = harness.case_model(case, tokenizer).eval()
    rows = harness.arithmetic_rows(case["prompts"], seed=case["seed"], prompt_tokens=case.get("prompt_tokens", 0))
    prompt_ids = [tokenizer(r["prompt"])["input_ids"] for r in rows]
    torch.manual_seed(case["seed"])
    return tokenizer, model, prompt_ids


def _timed(case: dict[str, Any], generate: Any) -> dict[str, Any]:
    import torch

    tokens_per_call = case["prompts"] * case["group"] * case["completion"]
    values, cpu_values, produced = [], [], []
    for i in range(case["warmup"] + case["steps"]):
        started, started_cpu = time.perf_counter(), time.process_time()
        count = generate()
        if case["device"].startswith("cuda"):
            torch.cuda.synchronize()
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - started_cpu
        if i >= case["warmup"]:
            values.append(count / seconds)
            cpu_values.append(count / cpu_seconds)
            produced.append(count)
    return {"values": values, "cpu_values": cpu_values, "tokens_per_call": tokens_per_call,
            "produced": sum(produced) / len(produced)}  # fmt: skip


def run_native(case: dict[str, Any]) -> dict[str, Any]:
    import torch

    from posttrain.rollout import ENGINES, SamplingParams

    tokenizer, model, prompt_ids = _setup(case)
    stop = (tokenizer.eos_token_id,) if case["stop_at_eos"] else ()
    params = SamplingParams(max_new_tokens=case["completion"], temperature=1.0, stop_token_ids=stop)
    generator = torch.Generator(device=model.device).manual_seed(case["seed"])
    engine = ENGINES["native"]
    base = harness.base_memory_mb(case["device"])

    def generate() -> int:
        out = engine.generate(model, prompt_ids, params, n=case["group"], generator=generator)
        return sum(len(c) for c in out.completion_ids)

    flops = harness.generation_flops(model.config, [len(p) for p in prompt_ids], case["group"], case["completion"])
    return {**_timed(case, generate), "base_mb": base, "flops": flops}


def run_generate(case: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import GenerationConfig

    tokenizer, model, prompt_ids = _setup(case)
    device = model.device
    rows = [p for p in prompt_ids for _ in range(case["group"])]  # TRL's sampler repeats each prompt G times
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r)
        attention_mask[i, width - len(r) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    config = GenerationConfig(  # the fields TRL's GRPOTrainer sets on its transformers path
        max_new_tokens=case["completion"], do_sample=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id] if case["stop_at_eos"] else [],
        temperature=1.0, top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0, disable_compile=True,
    )  # fmt: skip
    base = harness.base_memory_mb(case["device"])

    def generate() -> int:
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        completions = out[:, width:]
        if not case["stop_at_eos"]:
            return completions.numel()
        is_eos = completions == tokenizer.eos_token_id
        ends = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, completions.shape[1])
        return int(ends.sum())

    return {**_timed(case, generate), "base_mb": base}


SIDES = {"native": run_native, "generate": run_generate}


def main() -> None:
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--completion", type=int, default=32)
    p.add_argument("--stop-at-eos", action="store_true", help="let EOS end completions (token counts then differ)")
    p.add_argument("--prompt-tokens", type=int, default=0, help="lengthen every prompt to about this many tokens")
    args = p.parse_args()
    if args.worker:
        return harness.worker_main(args.worker, SIDES)
    rounds = 1 if args.quick else args.rounds
    cases = []
    for size in harness.sizes_of(args):
        steps = 2 if args.quick else args.steps or DEFAULTS[size]["steps"]
        case = {
            "size": size, "prompts": args.prompts, "group": args.group, "completion": args.completion,
            "stop_at_eos": args.stop_at_eos, "steps": steps, "warmup": args.warmup, "device": args.device,
            "dtype": harness.dtype_of(args), "prompt_tokens": args.prompt_tokens, "seed": 0,
        }  # fmt: skip
        print(f"Generation, {size}: {case}", flush=True)
        sides = harness.alternate(__file__, case, ["native", "generate"], rounds=rounds, threads=args.threads)
        per_step = {s: 1000 * sides[s].extra["tokens_per_call"] / args.completion / sides[s].median for s in sides}
        note = (f"{args.prompts} prompts x {args.group} samples x {args.completion} tokens; per decode step: "
                f"native {per_step['native']:.1f} ms, generate {per_step['generate']:.1f} ms")  # fmt: skip
        cases.append(harness.CaseResult("Generation tokens/s", size, case, "tokens/s", sides, baseline="generate",
                                        ours="native", notes=[note]))  # fmt: skip
    harness.print_cases(cases)
    print(f"wrote {harness.write_json(args.json, __file__, cases)}")


if __name__ == "__main__":
    main()
