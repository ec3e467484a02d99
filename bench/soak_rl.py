"""Soak test: a long, tiny online-RL run that watches memory (RSS) and step time for leaks and slow-downs.

    OMP_NUM_THREADS=1 nice -n 10 python bench/soak_rl.py --steps 1000 --sample-every 50 --warmup 100

It runs GRPO on the arithmetic task with a new `qwen2-tiny` policy through the Python API
(`posttrain.api.rl`), checkpointing every `--save-every` steps as a real run would. The reward function
is also the probe: it is called exactly once per step (GRPO, no dynamic sampling), so every
`--sample-every` calls it records the process's resident set size (psutil, else /proc/self/status
VmRSS) and the wall time since the previous sample. The score it returns varies between samples (the
share of digits in a completion), so that advantages are not all zero and the policy really updates.

The verdict at the end:
- RSS growth after warm-up: last sample minus the sample at `--warmup`. The trainer keeps every step's
  metrics in memory (`history`: returned in the result and saved in each checkpoint for an exact
  resume), which grows by design by a couple of kB per step; the script measures that size and
  judges the growth it does not explain, which must be < 5% of the baseline RSS. Both are printed.
- throughput: the 10th percentile of `step_time_s` (the run's own metric) over the last window of
  `--sample-every` steps against the first window after warm-up, at most 10% slower. The 10th
  percentile, not the median, because on a shared machine other processes slow whole windows down;
  the medians and the wall time per step are printed too.
Exit code 0 when both hold, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def rss_mib() -> float:
    """Resident set size of this process in MiB."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # kB
        raise RuntimeError("no psutil and no VmRSS in /proc/self/status: cannot measure RSS") from None


@dataclass
class Sample:
    step: int
    rss_mib: float
    wall_s_per_step: float


class Probe:
    """The run's reward function: scores the share of digits in each completion and, every `every`
    calls (= steps), records RSS and wall time per step since the last sample."""

    __name__ = "digit_share"

    def __init__(self, every: int):
        self.every = every
        self.calls = 0
        self.samples: list[Sample] = []
        self._last = time.perf_counter()

    def __call__(self, *, completions: list[str], **kwargs: Any) -> list[float]:
        self.calls += 1
        if self.calls % self.every == 0 or self.calls == 1:
            now = time.perf_counter()
            steps = self.every if self.calls > 1 else 1
            self.samples.append(Sample(self.calls, rss_mib(), (now - self._last) / steps))
            self._last = now
        return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def run(args: argparse.Namespace) -> int:
    import torch

    from posttrain.api import rl

    torch.set_num_threads(args.threads)
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="posttrain-soak-")
    config = {
        "model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic"},
        "data": {"task": {"name": "arithmetic", "digits": 1, "train_size": 2000, "eval_size": 8}},
        "train": {"max_steps": args.steps, "lr": 1e-4, "save_every": args.save_every, "keep_last": 2},
        "rl": {
            "prompts_per_step": args.prompts,
            "group_size": args.group_size,
            "sampling": {"max_new_tokens": args.max_new_tokens},
        },
        "eval": {"max_new_tokens": 4, "limit": 8},
        "output_dir": output_dir,
        "seed": 0,
    }
    probe = Probe(args.sample_every)
    started = time.perf_counter()
    result = rl(config, rewards=[probe], progress=False)
    total_s = time.perf_counter() - started
    print(
        f"soak: {len(result.history)} RL steps in {total_s:.0f} s ({len(result.history) / total_s:.2f} steps/s), "
        f"P={args.prompts} G={args.group_size} max_new_tokens={args.max_new_tokens}, run dir {output_dir}"
    )
    return report(args, probe.samples, result.history)


def history_bytes_per_step(history: list[dict[str, Any]]) -> float:
    """Bytes the trainer's in-memory metrics history holds per step (each dict, its keys and values)."""
    seen: set[int] = set()
    total = 0
    for record in history:
        for obj in (record, *record.keys(), *record.values()):
            if id(obj) not in seen:
                seen.add(id(obj))
                total += sys.getsizeof(obj)
    return total / len(history) + 8  # + the list's pointer


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def report(args: argparse.Namespace, samples: list[Sample], history: list[dict[str, Any]]) -> int:
    step_times = [h["step_time_s"] for h in history]
    lengths = [h["completion_length"] for h in history]
    print(
        f"{'step':>6} {'rss_mib':>9} {'wall_s/step':>12} {'step_time_s p10':>16} {'median':>8} {'completion_len':>15}"
    )
    for s in samples:
        lo = max(0, s.step - args.sample_every)
        window = step_times[lo : s.step]
        print(
            f"{s.step:>6} {s.rss_mib:>9.1f} {s.wall_s_per_step:>12.4f} {percentile(window, 10):>16.4f} "
            f"{statistics.median(window):>8.4f} {statistics.mean(lengths[lo : s.step]):>15.2f}"
        )
    after = [s for s in samples if s.step >= args.warmup]
    if len(after) < 2:
        print(f"too few samples after warm-up step {args.warmup}: run more steps")
        return 1
    base, last = after[0], after[-1]
    grown_mib = last.rss_mib - base.rss_mib
    per_step = history_bytes_per_step(history)
    history_mib = per_step * (last.step - base.step) / 2**20
    unexplained = (grown_mib - history_mib) / base.rss_mib
    rss_ok = unexplained < 0.05
    print(
        f"RSS after warm-up: {base.rss_mib:.1f} MiB at step {base.step} -> {last.rss_mib:.1f} MiB at step "
        f"{last.step}: {grown_mib:+.1f} MiB ({grown_mib / base.rss_mib:+.2%})"
    )
    print(
        f"  of which the metrics history the trainer keeps (returned in the result, saved in checkpoints): "
        f"{per_step:.0f} bytes/step x {last.step - base.step} steps = {history_mib:.1f} MiB"
    )
    print(f"  growth not explained by the history: {unexplained:+.2%} ({'ok' if rss_ok else 'FAIL'}: < 5%)")
    first_w = step_times[args.warmup : args.warmup + args.sample_every]
    last_w = step_times[-args.sample_every :]
    slowdown = percentile(last_w, 10) / percentile(first_w, 10) - 1
    speed_ok = slowdown <= 0.10
    print(
        f"step time p10 (least disturbed by other processes on a shared machine): {percentile(first_w, 10):.4f} s "
        f"(steps {args.warmup + 1}-{args.warmup + args.sample_every}) -> {percentile(last_w, 10):.4f} s "
        f"(last {args.sample_every}): {slowdown:+.2%} ({'ok' if speed_ok else 'FAIL'}: <= +10%)"
    )
    return 0 if rss_ok and speed_ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=1000, help="RL steps (default 1000)")
    parser.add_argument("--sample-every", type=int, default=50, help="steps between RSS samples (default 50)")
    parser.add_argument("--warmup", type=int, default=100, help="steps before the RSS baseline (default 100)")
    parser.add_argument("--prompts", type=int, default=4, help="rl.prompts_per_step (default 4)")
    parser.add_argument("--group-size", type=int, default=4, help="rl.group_size (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="rl.sampling.max_new_tokens (default 8)")
    parser.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (default 100)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--output-dir", default=None, help="run directory (default: a new temporary one)")
    args = parser.parse_args(argv)
    if args.warmup + 2 * args.sample_every > args.steps:
        parser.error("--steps must be at least --warmup + 2 * --sample-every")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
