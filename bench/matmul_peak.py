"""The machine's measured matmul peak: float32 GEMM FLOP/s with the benchmark's torch threads (issue #7).

Every "floor" in the results is FLOPs divided by this number, so it is measured, not taken from a data
sheet: square float32 matmuls of a few sizes, best of several repetitions, in a fresh worker process with
the same thread count as the benchmarks. On a GPU it is the bfloat16 and float32 dense matmul rate.

    python bench/matmul_peak.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness


def measure_peak(device: str = "cpu", sizes: tuple[int, ...] = (1024, 2048), seconds: float = 1.0) -> dict[str, float]:
    """Best float32 GEMM rate (FLOP/s) over `sizes`; each size is repeated for about `seconds`."""
    import torch

    rates = {}
    for n in sizes:
        a = torch.randn(n, n, device=device)
        b = torch.randn(n, n, device=device)
        for _ in range(2):
            a @ b
        best, started = 0.0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            t = time.perf_counter()
            a @ b
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = max(best, 2 * n**3 / (time.perf_counter() - t))
        rates[f"gemm_{n}"] = best
    rates["peak"] = max(rates.values())
    return rates


def run_peak(case: dict[str, Any]) -> dict[str, Any]:
    rates = measure_peak(case["device"], seconds=case["seconds"])
    return {"values": [rates["peak"] / 1e9], "base_mb": harness.rss_mb(), **{k: v / 1e9 for k, v in rates.items()}}


SIDES = {"peak": run_peak}


def main() -> None:
    p = harness.parser(__doc__.splitlines()[0])
    args = p.parse_args()
    if args.worker:
        return harness.worker_main(args.worker, SIDES)
    case = {"device": args.device, "seconds": 0.5 if args.quick else 1.5}
    runs = [harness.run_worker(__file__, "peak", case, args.threads) for _ in range(1 if args.quick else 2)]
    peak = max(r.values[0] for r in runs)
    print(f"matmul peak ({args.threads} threads, float32): {peak:.1f} GFLOP/s  {runs[-1].extra}")
    out = args.json or harness.OUT_DIR / "matmul_peak.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    import json

    out.write_text(json.dumps({"command": harness.command_line(), "machine": harness.machine(), "threads": args.threads,
                               "peak_gflops": peak, "runs": [r.extra for r in runs],
                               "foreign_load": max((r.foreign_load or 0.0) for r in runs)}, indent=1))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
