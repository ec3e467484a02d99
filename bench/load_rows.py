"""Time and peak memory of loading a large dataset file (issue #21, item 7): read and validate rows.

    OMP_NUM_THREADS=1 python bench/load_rows.py --rows 1000000 --formats jsonl json csv parquet
    OMP_NUM_THREADS=1 python bench/load_rows.py --long-row-mib 50
    OMP_NUM_THREADS=1 python bench/load_rows.py --rows 1000000 --encode --repeat 1

It writes `--rows` SFT rows (`{"prompt": "37+5=", "completion": "42"}`, about 36 bytes each in JSONL) to a
temporary directory in each format, then loads each file with `posttrain.data.load_examples(path, "sft")`
in a fresh Python process, so that one measurement's memory does not carry into the next, `--repeat` times.
For each format it prints the file size, the fastest load's wall and CPU time, the peak resident set size of
the process (`VmHWM`; `ru_maxrss` keeps the peak of this script, the parent, across the child's exec) and the
peak minus the resident size measured just before the call (the imports:
torch, transformers, pyarrow), the largest of the repeats, and the resident size after the call minus before
it: the examples kept (`load_examples` returns them). Peak near "after" means nothing but the examples piled
up while loading.

`--encode` also encodes the examples for SFT as the sft trainer's data phase does (`encode_sft` with `data.max_length`
512 and the arithmetic task's byte-level BPE tokenizer) and keeps the tokens, not the examples: its "after - before"
is what a trainer holds for the training set.

`--long-row-mib N` measures one JSONL row instead, whose completion is N MiB of text ("the sky is blue "
repeated): load it and encode it for SFT with `data.max_length` 512 and the arithmetic task's byte-level BPE
tokenizer, in a fresh process; it prints the time, the peak resident size over the imports, and the load
report (the row is truncated to 512 tokens), or the error (a row over `MAX_ROW_BYTES`, 16 MiB).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, time
from posttrain.data import load_examples

def rss_mib(field="VmRSS"):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")

encode = sys.argv[2] == "encode"
if encode:
    from posttrain.data import encode_sft
    from posttrain.trainers.build import build_builtin_tokenizer

    tokenizer = build_builtin_tokenizer("arithmetic")
before = rss_mib()
start, cpu = time.perf_counter(), time.process_time()
examples, report = load_examples(sys.argv[1], "sft")
if encode:
    examples = encode_sft(examples, tokenizer, max_length=512, report=report)
seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
peak = rss_mib("VmHWM")  # not ru_maxrss: it keeps the parent's peak across the exec of a vfork
print(json.dumps({"examples": len(examples), "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_mib": peak,
                  "before_mib": before, "after_mib": rss_mib()}))
"""


LONG_ROW_CHILD = """
import json, resource, sys, time
from posttrain.data import encode_sft, load_examples
from posttrain.trainers.build import build_builtin_tokenizer

tokenizer = build_builtin_tokenizer("arithmetic")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
try:
    examples, report = load_examples(sys.argv[1], "sft")
    tokens = encode_sft(examples, tokenizer, max_length=512, report=report)
    outcome = f"{len(tokens[0].input_ids)} tokens kept; {report.summary()}"
except ValueError as error:  # DataError
    outcome = f"error: {error}"
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "grown_mib": peak - before, "outcome": outcome}))
"""


def measure_long_row(mib: float, directory: Path) -> None:
    path = directory / "long.jsonl"
    repeat = int(mib * 2**20) // len("the sky is blue ")
    path.write_text(json.dumps({"prompt": "what color is the sky?", "completion": "the sky is blue " * repeat}) + "\n")
    out = subprocess.run([sys.executable, "-c", LONG_ROW_CHILD, str(path)], check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"one row of {path.stat().st_size / 2**20:.1f} MiB: {result['seconds']:.2f} s, peak RSS "
          f"{result['grown_mib']:.0f} MiB over the imports; {result['outcome']}")


def make_rows(n: int) -> list[dict[str, str]]:
    return [{"prompt": f"{i % 100}+{i % 7}=", "completion": str(i % 100 + i % 7)} for i in range(n)]


def write(rows: list[dict[str, str]], directory: Path, fmt: str) -> Path:
    path = directory / f"rows.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        path.write_text("prompt,completion\n" + "".join(f"{r['prompt']},{r['completion']}\n" for r in rows))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise ValueError(f"--formats: unknown format {fmt!r}")
    return path


def measure(path: Path, repeat: int, encode: bool) -> dict[str, float]:
    """The fastest of `repeat` loads, each in a fresh process (the machine is shared: the fastest is the least
    disturbed), with the largest peak memory of them."""
    results = []
    for _ in range(repeat):
        command = [sys.executable, "-c", CHILD, str(path), "encode" if encode else "load"]
        out = subprocess.run(command, check=True, capture_output=True, text=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = min(results, key=lambda r: r["seconds"])
    return best | {"peak_mib": max(r["peak_mib"] for r in results),
                   "grown_mib": max(r["peak_mib"] - r["before_mib"] for r in results),
                   "kept_mib": max(r["after_mib"] - r["before_mib"] for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--formats", nargs="+", default=["jsonl"], choices=["jsonl", "json", "csv", "parquet"])
    parser.add_argument("--repeat", type=int, default=3, help="loads per format; the fastest is shown")
    parser.add_argument("--encode", action="store_true", help="also encode for SFT and keep the tokens")
    parser.add_argument("--long-row-mib", type=float, default=None, help="measure one row this long instead")
    args = parser.parse_args()
    if args.long_row_mib is not None:
        with tempfile.TemporaryDirectory() as directory:
            measure_long_row(args.long_row_mib, Path(directory))
        return
    rows = make_rows(args.rows)
    with tempfile.TemporaryDirectory() as directory:
        paths = [write(rows, Path(directory), fmt) for fmt in args.formats]
        del rows
        print(f"{'format':8} {'file MiB':>9} {'rows':>9} {'load s':>7} {'CPU s':>6} {'peak RSS MiB':>13} "
              f"{'peak - before':>14} {'after - before':>15}")
        for fmt, path in zip(args.formats, paths):
            result = measure(path, args.repeat, args.encode)
            size = path.stat().st_size / 2**20
            print(f"{fmt:8} {size:9.1f} {result['examples']:9d} {result['seconds']:7.2f} {result['cpu_seconds']:6.2f} "
                  f"{result['peak_mib']:13.0f} {result['grown_mib']:14.0f} {result['kept_mib']:15.0f}")


if __name__ == "__main__":
    main()
