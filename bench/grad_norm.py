"""The total gradient norm the clipping reads: `guards.total_norm` against torch's `get_total_norm` (issue #7).

Gradients shaped like each size's parameters (random, std 1e-3); best of --repeats calls each, and each
result's relative error against the norm summed in float64.

    python bench/grad_norm.py --sizes tiny,30m
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,30m")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch

    from posttrain.runtime.guards import total_norm

    torch.set_num_threads(args.threads)
    tokenizer = harness.build_tokenizer()
    for size in [s.strip() for s in args.sizes.split(",")]:
        model = harness.build_model(size, tokenizer)
        generator = torch.Generator().manual_seed(0)
        grads = [torch.randn(p.shape, generator=generator) * 1e-3 for p in model.parameters()]
        exact = torch.stack([g.double().square().sum() for g in grads]).sum().sqrt().item()
        line = []
        for name, norm in (("total_norm", total_norm), ("get_total_norm", torch.nn.utils.get_total_norm)):
            best = float("inf")
            for _ in range(args.repeats):
                started = time.perf_counter()
                value = float(norm(grads))
                best = min(best, time.perf_counter() - started)
            line.append(f"{name} {best * 1e3:.2f} ms (relative error {abs(value - exact) / exact:.1e})")
        print(f"{size:>5}, {len(grads)} tensors, {sum(g.numel() for g in grads):,} values: " + "; ".join(line))


if __name__ == "__main__":
    main()
