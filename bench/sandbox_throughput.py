"""Sandbox throughput: programs and code-reward rows per second, with and without looping completions (issue #21).

    python bench/sandbox_throughput.py            # about 4 minutes on 2 cores
    python bench/sandbox_throughput.py --quick    # smoke run (seconds; numbers not meaningful)
    PYTHONPATH=<checkout of 993dea5>/src python bench/sandbox_throughput.py --baseline   # the harness before #21

Cases, each one timed call after a warm-up run (prints a markdown table for bench/RESULTS.md):

- `run_python`: trivial programs (`pass`), 64 of them from `concurrency` threads: the sandbox's own cost.
- `code_tests`, functional: MBPP-shaped rows (a 3-line function, 3 asserts), one linked run each (checker and
  solution server: 2 launchers, 2 programs).
- `code_tests`, stdin/stdout: rows of 2 cases, one run each.
- `code_tests` with a looping fraction: the functional rows with 25% and 50% `while True` completions, scored
  through a RewardSet at its defaults (timeout_s 30 s) and the reward's (wall_time_s 10, first_pass_s 2); then
  the same with wall_time_s 2 and first_pass_s 0.5.

Columns: rows (or programs) per second; sandboxed programs started per second; the CPU time of all of them
per program (user + system of the launchers and what they waited for); the honest rows' scores (all must be
1.0 and every looping row 0.0); foreign load, the CPU cores other processes used meanwhile (the machine is
shared: it is read over one idle second before each case; a figure above ~0.3 means the numbers are contended).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

ADD = "def add(a, b):\n    total = a + b\n    return total\n"
LOOP = "def add(a, b):\n    while True:\n        pass\n"
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]
SUM_PROGRAM = "a, b = map(int, input().split())\nprint(a + b)"
STDIO_TESTS = {"inputs": ["1 2\n", "5 7\n"], "outputs": ["3\n", "12\n"]}


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime + own.ru_utime + own.ru_stime


def foreign_load(seconds: float = 1.0) -> float:
    """Cores busy on the machine over `seconds` while this process only sleeps: other sessions' work."""
    hz, busy0 = os.sysconf("SC_CLK_TCK"), harness._busy_jiffies()
    time.sleep(seconds)
    busy1 = harness._busy_jiffies()
    return float("nan") if busy0 is None or busy1 is None else (busy1 - busy0) / hz / seconds


def measure(name: str, rows: int, programs_per_row: int, fn: Callable[[], list[float] | None],
            expected: list[float] | None, *, count_cpu: bool = True) -> dict:
    """count_cpu: the CPU of programs killed at a limit is never reported to their launcher (it is killed
    too), so looping cases leave the column out."""
    load = foreign_load()
    cpu0, start = cpu_s(), time.monotonic()
    scores = fn()
    wall = time.monotonic() - start
    programs = rows * programs_per_row
    cpu_ms = 1000 * (cpu_s() - cpu0) / programs if count_cpu else float("nan")
    correct = "" if expected is None else ("all right" if scores == expected else f"WRONG: {scores}")
    row = {"case": name, "rows": rows, "seconds": wall, "rows_per_s": rows / wall, "programs_per_s": programs / wall,
           "cpu_ms_per_program": cpu_ms, "scores": correct, "foreign_load": load}
    print(f"{name}: {rows / wall:.2f} rows/s, {wall:.1f} s, {correct}, foreign load {load:.2f}", flush=True)
    return row


def trivial_programs(n: int, concurrency: int) -> Callable[[], None]:
    from posttrain.rewards.sandbox import SandboxLimits, run_python

    def run() -> None:
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda _: run_python("pass", limits=SandboxLimits()), range(n)))
        assert all(r.ok for r in results)

    return run


def code_rows(completions: list[str], tests: list, **kwargs) -> Callable[[], list[float]]:
    from posttrain.rewards.code import code_tests_reward

    return lambda: code_tests_reward(["p"] * len(completions), completions, tests=tests, **kwargs)


def reward_set_rows(completions: list[str], args: dict) -> Callable[[], list[float]]:
    from posttrain.rewards import RewardSet, RewardSpec

    rewards = RewardSet.from_specs([RewardSpec("code_tests", args=args)])  # timeout_s: the default 30 s

    def run() -> list[float]:
        result = rewards.score(["p"] * len(completions), completions, [[0]] * len(completions),
                               {"tests": [TESTS] * len(completions)})
        assert result.failures == {"code_tests": 0}
        return result.per_reward["code_tests"].tolist()

    return run


def looping(n: int, fraction: float) -> list[str]:
    loops = round(n * fraction)
    return [LOOP if i * loops // n != (i + 1) * loops // n else ADD for i in range(n)]  # spread through the batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--concurrency", default="1,2,4", help="comma-separated worker counts for the honest cases")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--baseline", action="store_true",
                   help="for the single-process harness before issue #21 (one program a row): only the cases its "
                        "API has, run_python and honest functional rows")
    args = p.parse_args()
    n = 4 if args.quick else args.rows
    levels = [int(c) for c in args.concurrency.split(",")]
    from posttrain.rewards.sandbox import probe_isolation

    print(f"machine: {harness.machine()}, isolation: {probe_isolation()}", flush=True)
    trivial_programs(2, 1)()  # warm-up: the page cache holds the interpreter and the launcher
    results = []
    for c in levels:
        results.append(measure(f"run_python('pass'), concurrency {c}", 2 * n, 1, trivial_programs(2 * n, c), None))
    code_rows([ADD], [TESTS])()
    for c in levels:
        results.append(measure(f"code_tests functional, concurrency {c}", n, 1 if args.baseline else 2,
                               code_rows([ADD] * n, [TESTS] * n, concurrency=c), [1.0] * n))
    if args.baseline:
        return print_table(results)
    results.append(measure("code_tests stdin/stdout (2 cases a row), concurrency 2", n, 2,
                           code_rows([SUM_PROGRAM] * n, [STDIO_TESTS] * n, concurrency=2), [1.0] * n))
    settings = [({}, "defaults (wall 10 s, first pass 2 s)"), ({"wall_time_s": 2.0, "first_pass_s": 0.5},
                                                                "wall 2 s, first pass 0.5 s")]
    for fraction in (0.25, 0.5):
        completions = looping(n, fraction)
        expected = [0.0 if c is LOOP else 1.0 for c in completions]
        for reward_args, label in settings:
            results.append(measure(f"code_tests functional, {fraction:.0%} looping, {label}", n, 2,
                                   reward_set_rows(completions, reward_args), expected, count_cpu=False))
    print_table(results)


def print_table(results: list[dict]) -> None:
    print("\n| case | rows | seconds | rows/s | programs/s | CPU ms per program | scores | foreign load before |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        cpu = "-" if r["cpu_ms_per_program"] != r["cpu_ms_per_program"] else f"{r['cpu_ms_per_program']:.0f}"
        print(f"| {r['case']} | {r['rows']} | {r['seconds']:.1f} | {r['rows_per_s']:.2f} | {r['programs_per_s']:.1f} | "
              f"{cpu} | {r['scores'] or '-'} | {r['foreign_load']:.2f} |")


if __name__ == "__main__":
    main()
