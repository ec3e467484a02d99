"""The native engine's packed decode layers against its unpacked ones, in one process (issue #7).

`rollout/decoders.py` decodes a small float32 CPU model through packed layer ops (q/k/v and gate/up stacked,
RMSNorm moved past its products with its weight folded in, residual adds inside addmm); `PACK_MAX_VALUES` sets
which models. This generates P prompts x G samples x L tokens (no stop at EOS) with packing on and off,
alternating, and reports each side's median seconds of wall and of process CPU time (the steadier one on a shared
machine), their ratios, and whether both drew the same tokens. `--families`: the tiny preset of each family
(`<family>-small`) instead of the sizes.

    python bench/packed_decode.py --sizes tiny,30m --rounds 12
    python bench/packed_decode.py --families qwen2,gemma2,olmo2 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,30m")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--completion", type=int, default=32)
    p.add_argument("--rounds", type=int, default=12, help="timed generations per side, alternating")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--families", default=None, help="comma-separated families: their tiny presets")
    args = p.parse_args()

    import torch

    import posttrain.rollout.decoders as decoders
    from posttrain.policies.families import family_of
    from posttrain.rollout import ENGINES, SamplingParams

    torch.set_num_threads(args.threads)
    limits = {"packed": 1 << 62, "unpacked": 0}
    params = SamplingParams(max_new_tokens=args.completion, temperature=1.0)
    tokenizer = harness.build_tokenizer()
    print(f"threads {args.threads}, {args.prompts} x {args.group} x {args.completion} tokens, {args.rounds} rounds")
    runs = [(s.strip(), None) for s in args.sizes.split(",")] if args.families is None else [
        ("tiny", f.strip()) for f in args.families.split(",")
    ]  # fmt: skip
    for size, family in runs:
        model = harness.build_model(size, tokenizer, family=family).eval()
        prompt_ids = [tokenizer(r["prompt"])["input_ids"] for r in harness.arithmetic_rows(args.prompts)]

        def generate(limit: int, model: Any = model, prompt_ids: list[list[int]] = prompt_ids) -> tuple[Any, ...]:
            decoders.PACK_MAX_VALUES = limit
            generator = torch.Generator().manual_seed(0)
            started, cpu = time.perf_counter(), time.process_time()
            out = ENGINES["native"].generate(model, prompt_ids, params, n=args.group, generator=generator)
            return time.perf_counter() - started, time.process_time() - cpu, out.completion_ids

        same = generate(limits["packed"])[2] == generate(limits["unpacked"])[2]
        decoders.PACK_MAX_VALUES = limits["packed"]
        applies = decoders.packed_layers(model, family_of(model), list(model.model.layers)) is not None
        times: dict[str, list[tuple[float, float]]] = {side: [] for side in limits}
        for round_ in range(args.rounds):
            for side in list(limits) if round_ % 2 else list(limits)[::-1]:
                times[side].append(generate(limits[side])[:2])
        (packed, packed_cpu), (unpacked, unpacked_cpu) = (
            [statistics.median(t[i] for t in times[s]) for i in (0, 1)] for s in ("packed", "unpacked")
        )
        print(
            f"{size if family is None else family:>9}: packed {packed * 1e3:7.1f} ms ({packed_cpu * 1e3:7.1f} ms CPU), "
            f"unpacked {unpacked * 1e3:7.1f} ms ({unpacked_cpu * 1e3:7.1f} ms CPU), speed-up {unpacked / packed:.3f}x "
            f"(CPU {unpacked_cpu / packed_cpu:.3f}x); packing applies: {applies}; same tokens: {same}"
        )


if __name__ == "__main__":
    main()
