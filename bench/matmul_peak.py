"""The machine's measured matmul peak: GEMM FLOP/s with the benchmark's torch threads and dtype (issue #7).

Every "floor" in the results is FLOPs divided by this number, so it is measured, not taken from a data
sheet: square float32 matmuls of a few sizes, best of several repetitions, in a fresh worker process with
the same thread count as the benchmarks. On a CPU both kernels PyTorch ships are timed, its default BLAS
(`torch.mm`: MKL in the standard wheels) and oneDNN (the kernel posttrain's linear layers choose where it
is faster, `posttrain.policies.cpu_matmul`), and the peak is the faster: on an AMD processor MKL does not
use AVX-512 and reaches about half of what the cores can do. On a GPU it is the dense matmul rate in the
run's dtype (`--dtype`; bfloat16 by default there, as the issue's GPU case).

    python bench/matmul_peak.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness


def measure_peak(
    device: str = "cpu", sizes: tuple[int, ...] = (1024, 2048), seconds: float = 1.0, dtype: str = "float32"
) -> dict[str, float]:
    """Best GEMM rate (FLOP/s) in `dtype` over `sizes` and kernels (`mm_N`, and `onednn_N` on a CPU that has
    it, in float32); each is repeated for about `seconds`. `peak` is the best of them. On a GPU the sizes are
    4096 and 8192, products large enough to keep every streaming multiprocessor busy."""
    import torch

    from posttrain.policies import cpu_matmul

    kernels = {"mm": torch.mm}
    if device == "cpu" and dtype == "float32" and cpu_matmul.onednn_available():
        kernels["onednn"] = lambda a, b: cpu_matmul.onednn_product(a, b.T)
    if device.startswith("cuda"):
        sizes = (4096, 8192)
    rates = {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
        b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
        for name, kernel in kernels.items():
            rates[f"{name}_{n}"] = _best_rate(kernel, a, b, seconds)
    rates["peak"] = max(rates.values())
    return rates


def _best_rate(kernel: Any, a: Any, b: Any, seconds: float) -> float:
    import torch

    for _ in range(2):
        kernel(a, b)
    best, started = 0.0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        t = time.perf_counter()
        kernel(a, b)
        if a.device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * a.shape[0] ** 3 / (time.perf_counter() - t))
    return best


def run_peak(case: dict[str, Any]) -> dict[str, Any]:
    rates = measure_peak(case["device"], seconds=case["seconds"], dtype=case["dtype"])
    return {"values": [rates["peak"] / 1e9], "base_mb": harness.rss_mb(), **{k: v / 1e9 for k, v in rates.items()}}


SIDES = {"peak": run_peak}


def main() -> None:
    p = harness.parser(__doc__.splitlines()[0])
    args = p.parse_args()
    if args.worker:
        return harness.worker_main(args.worker, SIDES)
    case = {"device": args.device, "dtype": harness.dtype_of(args), "seconds": 0.5 if args.quick else 1.5}
    runs = [harness.run_worker(__file__, "peak", case, args.threads) for _ in range(1 if args.quick else 2)]
    peak = max(r.values[0] for r in runs)
    print(f"matmul peak ({args.threads} threads, {case['dtype']}): {peak:.1f} GFLOP/s  {runs[-1].extra}")
    out = args.json or harness.OUT_DIR / "matmul_peak.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    import json

    out.write_text(json.dumps({"command": harness.command_line(), "machine": harness.machine(), "threads": args.threads,
                               "peak_gflops": peak, "runs": [r.extra for r in runs],
                               "foreign_load": max((r.foreign_load or 0.0) for r in runs)}, indent=1))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
