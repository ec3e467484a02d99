"""Run every benchmark (sizes tiny and 30m) and rewrite the generated part of bench/RESULTS.md (issue #7).

    make bench                      # installs the pinned `bench` extra (TRL), then runs this
    python bench/run_all.py         # the same, in an environment that already has it
    python bench/run_all.py --quick # smoke run of every script (minutes; numbers not meaningful)

Scripts run one after the other and each starts one worker process at a time, so no two multi-threaded
torch processes ever overlap. Raw results go to runs/bench/*.json. Everything between the two markers in
RESULTS.md is replaced; the rest of the file is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "RESULTS.md"
START, END = "<!-- bench/run_all.py: generated from here -->", "<!-- bench/run_all.py: generated up to here -->"

SCRIPTS: list[tuple[str, list[str]]] = [
    ("matmul_peak.py", []),
    ("grpo_step.py", ["--sizes", "tiny,30m"]),
    ("dpo_step.py", ["--sizes", "tiny,30m", "--references", "default,precomputed"]),
    ("sft.py", ["--sizes", "tiny,30m"]),
    ("generation.py", ["--sizes", "tiny,30m"]),
    ("logprobs.py", ["--sizes", "tiny"]),
    ("scaling.py", ["--sizes", "tiny", "--rounds", "1"]),
    ("profile_grpo.py", ["--sizes", "tiny,30m"]),
]

TRL_SETTINGS = """\
TRL 1.16.0 runs on the settings a competent user picks for this machine: `gradient_checkpointing=False` and
`bf16=False` (TRL defaults both to True; on CPU checkpointing made a tiny GRPO step about 7x slower), `use_cpu`,
`report_to="none"`, `logging_steps=1`, no checkpoints, the default non-vLLM generation path (`model.generate`),
its default optimiser (fused AdamW) and, for SFT with packing, the faster of its two packing strategies (measured
each run). Both sides: float32, the same preset model with the same seed (identical initial weights), the arithmetic
tokenizer built by `posttrain.tasks`, the same rows and reward, one optimiser step per step, grad-norm 1.0,
constant learning rate, logging every step. posttrain runs through its public API (`posttrain.rl`,
`posttrain.pref`, `posttrain.sft`) exactly as a user calls it. A step is timed from the end of one optimiser step
to the end of the next (generation, scoring, reference, forward, backward, optimiser and logging included); warm-up
steps are dropped; rounds alternate the order of the sides, each side in a fresh process.

Differences that remain, by design or unavoidable: TRL's `generate` path prefills every prompt once per sample
(its sampler repeats each prompt G times) and keeps finished rows in the batch, while posttrain's engine prefills
each prompt once and drops finished rows (that is what is measured); TRL loads its reference model from the
policy's saved directory, posttrain copies the policy (same weights); both sides use fused AdamW; sampling stops
at EOS on both sides, so completion lengths differ a little between runs (each case reports the tokens per step);
reference precomputation (DPO) happens before the first step on both sides and is not in the step time; TRL's
`wrapped` packing cuts documents and lets them attend to each other, so it is not the same computation as
posttrain's packing (block-diagonal attention per document) or TRL's `bfd`, which are. `torch.compile` was tried
for the training forward and backward on this CPU and did not pay (tiny model: 185 ms eager against 193 ms
compiled per forward + backward, after 54 s of compilation), so neither side uses it."""


def run_script(name: str, args: list[str], common: list[str]) -> bool:
    """Run one script; its previous JSON is removed first, so a failed script leaves no stale numbers."""
    out = harness.OUT_DIR / f"{Path(name).stem}.json"
    out.unlink(missing_ok=True)
    command = [sys.executable, str(BENCH / name), *args, *common, "--json", str(out)]
    print(f"\n=== {' '.join(command[1:])}", flush=True)
    return subprocess.run(command, cwd=harness.ROOT).returncode == 0


def load(name: str) -> dict[str, Any]:
    return json.loads((harness.OUT_DIR / f"{Path(name).stem}.json").read_text())


def per_step_seconds(case: dict[str, Any], side: str) -> float:
    """A side's median time per step (or per generation call) whatever the case's unit."""
    s = case["sides"][side]
    if case["unit"] == "s":
        return s["median"]
    per_step = s["extra"].get("tokens_per_step") or s["extra"].get("tokens_per_call")
    return per_step / s["median"]


def goals(cases: dict[str, list[dict[str, Any]]], peak_gflops: float) -> list[tuple[str, str, str]]:
    """(goal, measured, verdict) rows for issue #7's targets."""

    def find(script: str, name: str, size: str) -> dict[str, Any] | None:
        return next((c for c in cases.get(script, []) if c["name"] == name and c["size"] == size), None)

    rows = []
    for script, name, target in [
        ("grpo_step", "GRPO step", 3.0),
        ("dpo_step", "DPO step (default)", 1.5),
        ("sft", "SFT tokens/s, no packing", 1.3),
        ("sft", "SFT tokens/s, packing", 1.3),
        ("generation", "Generation tokens/s", 2.0),
    ]:
        c = find(script, name, "tiny")
        if c is None:
            continue
        measured = f"{c['speedup']:.2f}x (CPU time: {c['cpu_speedup']:.2f}x)" if c.get("cpu_speedup") else ""
        rows.append((f"tiny: {name} >= {target}x {c['baseline']}", measured or f"{c['speedup']:.2f}x",
                     "met" if c["speedup"] >= target else "not met"))  # fmt: skip
    for script, name in [
        ("grpo_step", "GRPO step"),
        ("dpo_step", "DPO step (default)"),
        ("dpo_step", "DPO step (precomputed)"),
        ("sft", "SFT tokens/s, no packing"),
        ("sft", "SFT tokens/s, packing"),
        ("generation", "Generation tokens/s"),
    ]:
        c = find(script, name, "30m")
        if c is None:
            continue
        extra = c["sides"][c["ours"]]["extra"]
        if extra.get("flops"):
            t = per_step_seconds(c, c["ours"])
            floor = extra["flops"] / (peak_gflops * 1e9)
            measured = f"{t / floor:.2f}x ({t * 1000:.0f} ms against {floor * 1000:.0f} ms)"
            if extra.get("flops_shared_prompt"):
                shared = extra["flops_shared_prompt"] / (peak_gflops * 1e9)
                measured += f"; {t / shared:.2f}x the {shared * 1000:.0f} ms floor of each prompt computed once"
            rows.append((f"30m: {name} within 1.3x of its FLOP floor", measured,
                         "met" if t / floor <= 1.3 else "not met"))  # fmt: skip
        ours, base = c["sides"][c["ours"]]["peak_mb"], c["sides"][c["baseline"]]["peak_mb"]
        rows.append((f"30m: {name} peak memory <= {c['baseline']}'s", f"{ours:,.0f} MB against {base:,.0f} MB",
                     "met" if ours <= base else "not met"))  # fmt: skip
    return rows


def floors(cases: dict[str, list[dict[str, Any]]], peak_gflops: float) -> str:
    lines = ["| case | size | posttrain per step | FLOP floor | posttrain / floor | baseline / floor "
             "| floor, each prompt once | posttrain / that |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for script in ("grpo_step", "dpo_step", "sft", "generation"):
        for c in cases.get(script, []):
            ours = c["sides"][c["ours"]]
            if not ours["extra"].get("flops"):
                continue
            floor = ours["extra"]["flops"] / (peak_gflops * 1e9)
            base = c["sides"][c["baseline"]]
            base_flops = base["extra"].get("flops") or ours["extra"]["flops"]
            base_ratio = per_step_seconds(c, c["baseline"]) / (base_flops / (peak_gflops * 1e9))
            t = per_step_seconds(c, c["ours"])
            shared = ours["extra"].get("flops_shared_prompt", 0.0) / (peak_gflops * 1e9)
            shared_cells = f"{harness.fmt(shared, 's')} | {t / shared:.2f}x" if shared else "- | -"
            lines.append(f"| {c['name']} | {c['size']} | {harness.fmt(t, 's')} | {harness.fmt(floor, 's')} | "
                         f"{t / floor:.2f}x | {base_ratio:.2f}x | {shared_cells} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def section(title: str, doc: dict[str, Any], intro: str) -> str:
    parts = [f"### {title}", "", intro, "", f"Command: `{doc['command']}`", "", harness.table(doc["cases"])]
    notes = [f"- {c['name']} ({c['size']}): {n}" for c in doc["cases"] for n in c.get("notes", [])]
    return "\n".join(parts + notes + [""])


def peak_note(peak: dict[str, Any]) -> str:
    """What the peak is and which kernel posttrain's linear layers take on this machine, from the rates measured."""
    rates = best_rates(peak)
    mm, onednn = rates.get("mm", 0.0), rates.get("onednn", 0.0)
    common = (
        "The peak is the faster of the two float32 matmul kernels PyTorch ships, timed in the same worker: its "
        "default BLAS (`torch.mm`, Intel MKL in the standard wheels) and oneDNN; every floor below is at that rate. "
        "posttrain sends its float32 linear layers to oneDNN only where a probe at start-up finds it at least 1.25x "
        "faster (`posttrain.policies.cpu_matmul`; for weights of at least 65,536 values in products of at least 16 "
        "rows and 4M multiply-adds); TRL runs the model's `nn.Linear` layers, so MKL, and has no setting that "
        "changes that."
    )
    if onednn >= 1.25 * mm:
        return common + (
            f" Here oneDNN is {onednn / mm:.1f}x MKL (MKL does not use AVX-512 on AMD processors; "
            "`MKL_ENABLE_INSTRUCTIONS=AVX512` and `MKL_DEBUG_CPU_TYPE=5` change nothing), so the 30m model's "
            "layers run on oneDNN and the tiny model's on MKL."
        )
    return common + (
        f" Here the two are within {max(mm, onednn) / max(min(mm, onednn), 1e-9):.2f}x of each other, so both sides "
        "run their linear layers on MKL. (On the AMD Zen 5 machine of earlier runs oneDNN was 2.2x MKL, and "
        "posttrain's 30m layers ran on it.)"
    )


def best_rates(peak: dict[str, Any]) -> dict[str, float]:
    """Each kernel's best rate in GFLOP/s over the peak runs, e.g. {'onednn': 459, 'mm': 208}."""
    best: dict[str, float] = {}
    for run in peak.get("runs", []):
        for key, rate in run.items():
            if key != "peak" and "_" in key:
                kernel = key.rsplit("_", 1)[0]
                best[kernel] = max(best.get(kernel, 0.0), rate)
    return best


def kernel_rates(peak: dict[str, Any]) -> str:
    """Each kernel's best rate over the peak runs, e.g. 'onednn 459, mm 208 GFLOP/s'."""
    best = best_rates(peak)
    return ", ".join(f"{k} {v:.0f}" for k, v in sorted(best.items(), key=lambda kv: -kv[1])) + " GFLOP/s"


def render(
    elapsed_s: float, quick: bool, load_before: list[float], load_after: list[float], failed: list[str],
    reruns: list[str],
) -> str:
    m = harness.machine()
    peak = load("matmul_peak")
    done = [n for n, _ in SCRIPTS if n != "matmul_peak.py" and (harness.OUT_DIR / f"{Path(n).stem}.json").exists()]
    docs = {name: load(name) for name in done}
    cases = {Path(n).stem: d.get("cases", []) for n, d in docs.items()}
    peak_gflops = peak["peak_gflops"]
    loads = [s.get("foreign_load") for cs in cases.values() for c in cs for s in c["sides"].values()]
    loads = [x for x in loads if x is not None]
    out = [
        START,
        "",
        "## Benchmarks against TRL (issue #7)",
        "",
        f"Machine: {m['cores']} CPU cores ({m['cpu']}), no GPU; Python {m['python']}, torch {m['torch']}, "
        f"transformers {m['transformers']}, TRL {m['trl']}. Date: {m['date']}. Threads per worker: "
        f"{peak['threads']}. Measured float32 matmul peak: **{peak_gflops:.0f} GFLOP/s** "
        f"({kernel_rates(peak)}).",
        "",
        peak_note(peak),
        "",
        f"Command: `make bench` (= `python bench/run_all.py{' --quick' if quick else ''}`), "
        f"{elapsed_s / 60:.1f} minutes. Load average before: {load_before}; after: {load_after}. "
        f"CPU time used by other processes while a worker ran (foreign load, in cores): at most "
        f"{max(loads, default=0):.2f}." + (" **The machine was shared during this run: wall-time numbers are "
        "contended; the CPU-time speed-ups are the steadier reading.**" if max(loads, default=0) > 0.2 else ""),
        "",
        "Reading the tables: speed-up = baseline time / posttrain time from medians (for rates, posttrain rate / "
        "baseline rate), so above 1 means posttrain is faster. CPU-time speed-up is the same ratio from each "
        "worker's process CPU time. Peak MB is each side's own process peak RSS. Sizes: tiny = `qwen2-small` (the "
        "demo model, 0.84M parameters), 30m = `qwen2-30m` (25M parameters), both with the 378-token arithmetic "
        "vocabulary.",
        "",
        TRL_SETTINGS,
        "",
        *([f"**Failed in this run** (see the command's output): {', '.join(failed)}.", ""] if failed else []),
        *([f"Re-run after the full run with `python bench/run_all.py --only ...` (their sections show their own "
           f"commands and foreign load): {', '.join(reruns)}.", ""] if reruns else []),
        "### Goals",
        "",
        "| goal | measured | verdict |",
        "|---|---|---|",
        *[f"| {g} | {v} | {verdict} |" for g, v, verdict in goals(cases, peak_gflops)],
        "",
        "FLOP floors (FLOPs of the step at the measured matmul peak; 2 FLOPs per weight per token, the LM head only "
        "where log-probs are needed, causal attention, backward = 2 x forward, decode included). The FLOP floor "
        "computes every sequence whole, as TRL does and as the issue defines the step's work; posttrain's training "
        "forward computes a prompt shared by a GRPO group or a preference pair once (Prefix Grouper, "
        "arXiv:2506.05433), so it can run below that floor. The last two columns hold it to the floor of the work "
        "it does. (The GRPO profile below counts whole sequences too, so its training step's share of peak "
        "includes that saving.)",
        "",
        floors(cases, peak_gflops),
    ]
    intros = {
        "grpo_step.py": ("GRPO step", "8 prompts x 8 completions x at most 32 tokens, temperature 1, beta 0.04 "
                         "(a reference forward on both sides), one epoch, one optimiser step."),
        "dpo_step.py": ("DPO step", "32 arithmetic pairs per step, sigmoid DPO, beta 0.1; `default` is each side's "
                        "default way to get reference log-probs, `precomputed` is both precomputing them."),
        "sft.py": ("SFT throughput", "64 arithmetic demonstrations per step, completion-only loss; rows of 128 "
                   "tokens when packing. Tokens per second count every real token."),
        "generation.py": ("Generation", "The native engine against transformers `generate` called as TRL calls "
                          "it: 8 prompts x 8 samples x 32 new tokens, temperature 1."),
        "logprobs.py": ("Log-probs with a 152k vocabulary", "Forward + backward of per-token log-probs of one "
                        "2048-token sequence under a tiny Qwen2-shaped model with Qwen2's vocabulary."),
        "scaling.py": ("Scaling", "GRPO step time as the completion length doubles (G = 8) and as the group "
                       "size doubles (L = 32)."),
    }  # fmt: skip
    for name, (title, intro) in intros.items():
        if name in docs:
            out.append(section(title, docs[name], intro))
    if "profile_grpo.py" in docs:
        out += ["### Where a posttrain GRPO step's time goes", "", f"Command: `{docs['profile_grpo.py']['command']}`",
                "", docs["profile_grpo.py"]["markdown"]]  # fmt: skip
    out += [END, ""]
    return "\n".join(out)


def write_results(text: str) -> None:
    old = RESULTS.read_text() if RESULTS.exists() else "# Results\n\n"
    if START in old and END in old:
        new = old[: old.index(START)] + text + old[old.index(END) + len(END) :].lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    RESULTS.write_text(new)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: every script with --quick")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of every worker")
    p.add_argument("--only", default=None, help="comma-separated scripts to run (the others' last JSON is reused)")
    p.add_argument("--render-only", action="store_true", help="rewrite RESULTS.md from the last JSON files")
    args = p.parse_args()
    started, load_before = time.perf_counter(), harness.load_average()
    common = ["--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    only = None if args.only is None else {s.strip() for s in args.only.split(",")}
    failed = []
    if not args.render_only:
        for name, script_args in SCRIPTS:
            if (only is None or name in only or Path(name).stem in only) and not run_script(name, script_args, common):
                failed.append(name)
    meta_path = harness.OUT_DIR / "run_all.json"
    if args.render_only and meta_path.exists():
        meta = json.loads(meta_path.read_text())
    elif only is not None and meta_path.exists():  # a partial re-run: keep the full run's figures, say what changed
        meta = json.loads(meta_path.read_text())
        ran = [n for n, _ in SCRIPTS if n in only or Path(n).stem in only]
        meta["reruns"] = sorted(set(meta.get("reruns", [])) | set(ran))
        meta["failed"] = sorted((set(meta["failed"]) - set(ran)) | set(failed))
        meta_path.write_text(json.dumps(meta))
    else:
        meta = {"elapsed_s": time.perf_counter() - started, "quick": args.quick, "load_before": load_before,
                "load_after": harness.load_average(), "failed": failed}  # fmt: skip
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        meta_path.write_text(json.dumps(meta))
    write_results(render(meta["elapsed_s"], meta["quick"], meta["load_before"], meta["load_after"], meta["failed"],
                         meta.get("reruns", [])))  # fmt: skip
    print(f"\nwrote {RESULTS} in {(time.perf_counter() - started) / 60:.1f} minutes")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
