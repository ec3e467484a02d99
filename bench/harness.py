"""What every benchmark script shares: sizes, the model/tokenizer/data both sides build, one side per
fresh process, alternating rounds, memory and contention readings, summaries, JSON and markdown.

How a script runs (issue #7; DESIGN.md "Performance principles" and "Pitfalls"):

- The parent process never imports torch. For every round it starts one fresh worker process per side
  (`python bench/NAME.py --worker '{...}'`), one after the other, alternating the order of the sides
  from round to round. So at most one multi-threaded torch process runs at any time (DESIGN.md: two of
  them on this 2-core machine made a TRL step 25x slower), and each side's peak memory is its own
  process's peak RSS (`ru_maxrss`), or `torch.cuda.max_memory_allocated` on a GPU.
- A worker times every step of its loop and reports the steps after the warm-up ones. Step times of
  all rounds are pooled; the table shows their median, min and max.
- While each worker runs, the parent reads /proc/stat: CPU time spent by *other* processes, in cores,
  is reported as `foreign load`. A worker that ran beside more than 0.3 cores of other work is run again
  (twice at most) and the least contended attempt is kept; a figure that stays above ~0.3 in the tables
  means the machine was shared and those numbers are contended.

This module imports neither torch nor posttrain at the top, so the parent stays light; the helpers that
need them import inside.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "runs" / "bench"
RESULT_PREFIX = "BENCH_RESULT "

SIZES = {"tiny": "qwen2-small", "30m": "qwen2-30m", "0.5b": "qwen2-0.5b-shape"}
"""Benchmark sizes -> posttrain model presets. `tiny` is the demo model (0.84M parameters with the
arithmetic tokenizer), `30m` has about 25M, `0.5b` is Qwen2-0.5B-shaped (GPU only)."""
VOCAB_SIZES = {"0.5b": 151_936}
"""Sizes whose embedding and head have more rows than the arithmetic tokenizer's tokens: the issue's Qwen2-0.5B
shape has Qwen2's vocabulary, whose head and embedding are 136M of its 494M weights and whose [tokens, 151,936]
logits are most of a trainer's memory, so that random weights cost what the checkpoint costs per token. Sampled
ids beyond the tokenizer's decode to nothing (random weights give no answers anyway); the others use the
tokenizer's vocabulary."""
DTYPES = ("float32", "bfloat16")


# --- command line -------------------------------------------------------------------------------------


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", default="tiny", help=f"comma-separated model sizes: {', '.join(SIZES)}")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; each runs every side once, fresh")
    p.add_argument("--retries", type=int, default=RETRIES,
                   help="re-runs of a contended worker (0 under constant foreign load, where they only cost time)")
    p.add_argument("--steps", type=int, default=None, help="measured steps per side and round; None: per size")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of every worker")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the worker process")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                   help="weights of both sides, with autocast in that dtype where bfloat16; auto: bfloat16 on cuda "
                        "(the issue's GPU case), float32 on cpu")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="smoke run: smallest settings, one round")
    p.add_argument("--json", type=Path, default=None, help="where to write the results; None: runs/bench/NAME.json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def dtype_of(args: argparse.Namespace) -> str:
    """The weights' dtype of both sides: `--dtype`, where auto is bfloat16 on a GPU and float32 on a CPU."""
    if args.dtype != "auto":
        return args.dtype
    return "bfloat16" if args.device.startswith("cuda") else "float32"


def sizes_of(args: argparse.Namespace) -> list[str]:
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"--sizes: unknown {unknown}; known: {', '.join(SIZES)}")
    return sizes


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


# --- machine ------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """Cores, CPU model, library versions and the date; read without importing torch."""

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "trl": version("trl"),
        "posttrain": version("posttrain"),
        "date": dt.date.today().isoformat(),
        "loadavg": load_average(),
    }


def load_average() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def _busy_jiffies() -> int | None:
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return user + nice + system + irq + softirq + steal


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- workers ------------------------------------------------------------------------------------------


def worker_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",  # the Rust tokenizer's own thread pool would compete with torch's
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONWARNINGS="ignore",
    )
    return env


@dataclass
class Run:
    """One worker's report: per-step values and what it measured once."""

    side: str
    values: list[float]
    """Per measured step: seconds, or the case's unit."""
    peak_mb: float
    base_mb: float
    """Resident memory after building model and data, before the measured loop (CPU)."""
    foreign_load: float | None
    cpu_values: list[float] = field(default_factory=list)
    """Per measured step, from process CPU time instead of wall time (empty when not measured)."""
    extra: dict[str, Any] = field(default_factory=dict)


def run_worker(script: str, side: str, case: dict[str, Any], threads: int, timeout_s: float = 1800) -> Run:
    """Run one side of `case` in a fresh process and parse what it printed."""
    payload = json.dumps({"side": side, "case": case, "threads": threads})
    busy0, children0, wall0 = _busy_jiffies(), _children_cpu_s(), time.perf_counter()
    proc = subprocess.run(
        [sys.executable, script, "--worker", payload],
        env=worker_env(threads),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
    )
    busy1, children1, wall = _busy_jiffies(), _children_cpu_s(), time.perf_counter() - wall0
    foreign = None
    if busy0 is not None and busy1 is not None:
        hz = os.sysconf("SC_CLK_TCK")
        foreign = max(0.0, ((busy1 - busy0) / hz - (children1 - children0)) / wall)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + "\n" + proc.stderr).strip().splitlines()[-40:])
        raise RuntimeError(f"{script} worker '{side}' failed (exit {proc.returncode}):\n{tail}")
    report = json.loads(lines[-1][len(RESULT_PREFIX) :])
    values, peak, base = report.pop("values"), report.pop("peak_mb"), report.pop("base_mb")
    return Run(side, values, peak, base, foreign, report.pop("cpu_values", []), report)


def worker_main(payload: str, sides: dict[str, Callable[[dict[str, Any]], dict[str, Any]]]) -> None:
    """Inside a worker: set threads, run the side, print its report on one line."""
    request = json.loads(payload)
    import torch

    torch.set_num_threads(request["threads"])
    report = sides[request["side"]](request["case"])
    report.setdefault("peak_mb", peak_memory_mb(request["case"].get("device", "cpu")))
    print(RESULT_PREFIX + json.dumps(report), flush=True)


def rss_mb() -> float:
    """Current resident set size of this process, MB."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def peak_memory_mb(device: str = "cpu") -> float:
    """Peak RSS of this process (CPU), or the peak CUDA memory torch allocated (GPU), MB."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def base_memory_mb(device: str = "cpu") -> float:
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    return rss_mb()


class StepClock:
    """Wall and process-CPU time stamps taken at the end of every training step.

    Stamp i is taken when step i ends, so stamp[i] - stamp[i-1] is the whole of step i, logging included.
    Process CPU time counts this process's threads only; on a machine shared with other work it is the
    steadier reading (wall time also counts the time the scheduler gave to others)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def stamp(self) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def report(self, warmup: int, per_step: float | None = None) -> dict[str, list[float]]:
        """`values` (wall) and `cpu_values` per measured step: seconds, or `per_step / seconds` (a rate)."""
        wall, cpu = intervals(self.wall, warmup), intervals(self.cpu, warmup)
        if per_step is not None:
            wall, cpu = [per_step / s for s in wall], [per_step / s for s in cpu]
        return {"values": wall, "cpu_values": cpu}

    def trainer_callback(self) -> Any:
        """A transformers `TrainerCallback` that stamps at the end of every optimiser step (TRL)."""
        from transformers import TrainerCallback

        clock = self

        class StepEnd(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                clock.stamp()

        return StepEnd()

    def watch_posttrain(self) -> None:
        """Stamp whenever a posttrain trainer logs a training step (it logs every step: log_every=1)."""
        from posttrain.runtime.logging import RunLogger

        log = RunLogger.log

        def stamped(logger: Any, step: int, metrics: dict[str, float], *, kind: str = "train") -> None:
            log(logger, step, metrics, kind=kind)
            if kind == "train":
                self.stamp()

        RunLogger.log = stamped


def intervals(stamps: Sequence[float], warmup: int) -> list[float]:
    """Step times from end-of-step stamps, the first `warmup` steps dropped."""
    diffs = [b - a for a, b in itertools.pairwise(stamps)]
    return diffs[max(0, warmup - 1) :]


# --- shared building blocks (imported inside the workers) ---------------------------------------------


def build_tokenizer() -> Any:
    """The arithmetic task's byte-level BPE tokenizer, built locally (posttrain.tasks), as the trainers do."""
    from posttrain.tasks import build_builtin_tokenizer

    return build_builtin_tokenizer("arithmetic")


def preset_of(size: str, family: str | None = None) -> str:
    """The posttrain preset of a size, or of the tiny size in another model family (`<family>-small`, the demo
    model's shape in that family; qwen2's is the default)."""
    if family is None:
        return SIZES[size]
    if size != "tiny":
        raise SystemExit(f"--families: only the tiny size has a preset per family, not {size}")
    return f"{family}-small"


def build_model(size: str, tokenizer: Any, *, seed: int = 0, device: str = "cpu", dtype: str = "float32",
                family: str | None = None) -> Any:  # fmt: skip
    """A randomly initialised model of the size's preset (same seed -> same weights on both sides), float32 weights
    rounded to `dtype`, with the size's vocabulary (`VOCAB_SIZES`); `family`: that family's tiny preset."""
    import torch

    from posttrain.policies import build_model as build

    model = build(preset_of(size, family), tokenizer, seed=seed, vocab_size=VOCAB_SIZES.get(size))
    return model.to(device=device, dtype=getattr(torch, dtype))


def case_model(case: dict[str, Any], tokenizer: Any) -> Any:
    """`build_model` for a case: its size, family, seed, device and dtype."""
    return build_model(case["size"], tokenizer, seed=case["seed"], device=case["device"],
                       dtype=case.get("dtype", "float32"), family=case.get("family"))  # fmt: skip


def precision(case: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The posttrain config's `model` and `train` entries for the case's dtype: the weights' dtype, and bfloat16
    autocast where that is the dtype (as TRL's `bf16=True`, `trl_args`)."""
    dtype = case.get("dtype", "float32")
    return {"dtype": dtype}, {"bf16": dtype == "bfloat16"}


def trl_args(case: dict[str, Any], output_dir: str, *, lr: float) -> dict[str, Any]:
    """The TRL training arguments every case shares (RESULTS.md, "TRL settings"): the case's dtype (float32 on
    CPU; bfloat16 weights and `bf16=True` autocast where the case is bfloat16), gradient checkpointing off on a
    CPU (TRL's default, on, made a tiny GRPO step about 7x slower there) and TRL's default elsewhere (the issue's
    GPU figures are of TRL's default path), constant lr, no weight decay, grad-norm 1.0, one optimiser step per
    batch, logging every step, no checkpoints, warm-up plus timed steps."""
    dtype = case.get("dtype", "float32")
    return {
        "output_dir": output_dir, "model_init_kwargs": {"dtype": dtype}, "gradient_accumulation_steps": 1,
        "learning_rate": lr, "lr_scheduler_type": "constant", "weight_decay": 0.0, "max_grad_norm": 1.0,
        "max_steps": case["warmup"] + case["steps"], "bf16": dtype == "bfloat16",
        "use_cpu": case["device"] == "cpu", "report_to": "none", "logging_steps": 1, "save_strategy": "no",
        "disable_tqdm": True, "dataloader_num_workers": 0, "seed": case["seed"],
        **({"gradient_checkpointing": False} if case["device"] == "cpu" else {}),
    }  # fmt: skip


def save_model(size: str, tokenizer: Any, directory: str | Path, *, seed: int = 0, family: str | None = None) -> str:
    """The same model saved as a Hugging Face directory, for trainers that load their reference from a path
    (TRL builds its reference model from the policy's path)."""
    from posttrain.policies import save_pretrained

    save_pretrained(build_model(size, tokenizer, seed=seed, family=family), tokenizer, directory)
    return str(directory)


def arithmetic_rows(n: int, *, seed: int = 0, prompt_tokens: int = 0) -> list[dict[str, str]]:
    """`n` rows {prompt, completion, answer} of 2-digit addition and subtraction (`37+58=` -> `95`).

    `prompt_tokens` > 0: every prompt starts with as many worked sums (`0+0=0;`) as make the first prompt at
    least that many tokens long (the issue's GPU case has 64-token prompts; these are about 7)."""
    from posttrain.tasks import ArithmeticTask

    rows = ArithmeticTask(digits=2, operators="+-").sample(n, seed=seed)
    if prompt_tokens <= 0 or not rows:
        return rows
    tokenizer = build_tokenizer()
    prefix = ""
    while len(tokenizer(prefix + rows[0]["prompt"])["input_ids"]) < prompt_tokens:
        prefix += "0+0=0;"
    return [{**r, "prompt": prefix + r["prompt"]} for r in rows]


def arithmetic_reward(prompts: list[Any], completions: list[Any], answer: list[str], **kwargs: Any) -> list[float]:
    """1.0 when the completion's first integer is the answer (TRL's reward signature; posttrain takes it as is)."""
    from posttrain.tasks import verify

    return [1.0 if verify(str(c), a) else 0.0 for c, a in zip(completions, answer)]


def param_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def matmul_params(config: Any) -> dict[str, int]:
    """Weights that take part in matmuls: per layer (attention + MLP) and the LM head (V x H)."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = h * config.num_attention_heads * head_dim
    kv = 2 * h * config.num_key_value_heads * head_dim
    per_layer = q + kv + config.num_attention_heads * head_dim * h + 3 * h * inter
    return {"body": layers * per_layer, "head": config.vocab_size * h}


def forward_flops(config: Any, tokens: int, context_sum: float, head_tokens: int) -> float:
    """Forward FLOPs: 2 per weight per token in the body, the head at `head_tokens` positions only, and
    attention (QK^T and AV, 4 * d_attn per (query, key) pair) over `context_sum` = sum over tokens of the
    number of keys each attends to."""
    w = matmul_params(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    d_attn = config.num_attention_heads * head_dim
    return 2 * w["body"] * tokens + 2 * w["head"] * head_tokens + 4 * d_attn * context_sum * config.num_hidden_layers


def sequence_flops(config: Any, lengths: Sequence[int], head_counts: Sequence[int], *, backward: bool) -> float:
    """Forward (x3 with `backward`) FLOPs of full sequences of the given lengths, causal attention, the
    head at `head_counts[i]` positions of sequence i."""
    forward = sum(forward_flops(config, n, n * (n + 1) / 2, h) for n, h in zip(lengths, head_counts))
    return 3 * forward if backward else forward


def shared_prompt_flops(
    config: Any, prompt_lengths: Sequence[int], completion_lengths: Sequence[Sequence[float]], *, backward: bool
) -> float:
    """Forward (x3 with `backward`) FLOPs of prompts each followed by several completions when every prompt is
    computed once (posttrain's shared-prefix forward): the prompt over itself, each completion over the prompt
    and itself, the head at each completion's positions."""
    forward = 0.0
    for n, completions in zip(prompt_lengths, completion_lengths):
        forward += forward_flops(config, n, n * (n + 1) / 2, 0)
        forward += sum(forward_flops(config, c, c * n + c * (c + 1) / 2, c) for c in completions)
    return 3 * forward if backward else forward


def generation_flops(config: Any, prompt_lengths: Sequence[int], group: int, completion: float) -> float:
    """Minimal FLOPs of sampling `group` completions of `completion` tokens (a mean) per prompt: one
    prefill per prompt (head at its last position), then every further token decoded over the cache."""
    flops = sum(forward_flops(config, n, n * (n + 1) / 2, 1) for n in prompt_lengths)
    decoded = max(0.0, completion - 1)
    for n in prompt_lengths:
        context = decoded * n + decoded * (decoded + 1) / 2
        flops += group * forward_flops(config, decoded, context, decoded)
    return flops


def grpo_flops(
    config: Any, prompt_lengths: Sequence[int], group: int, completion: float, beta: float, *, shared: bool = False
) -> float:
    """Minimal FLOPs of one GRPO step: generation, the reference forward when beta > 0, and the policy's
    forward and backward over prompt + completion (the head at completion positions only). With `shared`,
    the training and reference forwards compute each prompt once per group instead of once per sequence."""
    c = round(completion)
    if shared:
        completions = [[c] * group for _ in prompt_lengths]
        train = shared_prompt_flops(config, prompt_lengths, completions, backward=True)
        reference = shared_prompt_flops(config, prompt_lengths, completions, backward=False)
    else:
        lengths = [n + c for n in prompt_lengths for _ in range(group)]
        train = sequence_flops(config, lengths, [c] * len(lengths), backward=True)
        reference = sequence_flops(config, lengths, [c] * len(lengths), backward=False)
    return generation_flops(config, prompt_lengths, group, completion) + (reference if beta > 0 else 0.0) + train


# --- rounds and summaries -----------------------------------------------------------------------------


@dataclass
class SideSummary:
    median: float
    min: float
    max: float
    n: int
    peak_mb: float
    base_mb: float
    foreign_load: float | None
    cpu_median: float | None
    extra: dict[str, Any]


def summarise(runs: list[Run]) -> SideSummary:
    values = [v for r in runs for v in r.values]
    loads = [r.foreign_load for r in runs if r.foreign_load is not None]
    extra: dict[str, Any] = {}
    for r in runs:
        for k, v in r.extra.items():
            extra.setdefault(k, []).append(v)
    extra = {k: _merge(v) for k, v in extra.items()}
    return SideSummary(
        median=statistics.median(values) if values else float("nan"),
        min=min(values, default=float("nan")),
        max=max(values, default=float("nan")),
        n=len(values),
        peak_mb=max(r.peak_mb for r in runs),
        base_mb=max(r.base_mb for r in runs),
        foreign_load=max(loads) if loads else None,
        cpu_median=statistics.median(cpu) if (cpu := [v for r in runs for v in r.cpu_values]) else None,
        extra=extra,
    )


def _merge(values: list[Any]) -> Any:
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return statistics.median(values)
    return values[-1]


RETRIES = 2
"""Re-runs of a worker during which other processes used more than `QUIET_LOAD` cores."""
QUIET_LOAD = 0.3


def alternate(
    script: str, case: dict[str, Any], sides: Sequence[str], *, rounds: int, threads: int, log: bool = True,
    retries: int = RETRIES,
) -> dict[str, SideSummary]:
    """Run every side once per round, each in a fresh process, reversing the order every other round.

    A worker during which other processes kept more than `QUIET_LOAD` cores busy is run again (at most
    `retries` times) and the least contended attempt is kept: on a shared 2-core machine one burst of someone
    else's work makes a 2-thread step several times slower."""
    runs: dict[str, list[Run]] = {s: [] for s in sides}
    for r in range(rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for side in order:
            attempts = [run_worker(script, side, case, threads)]
            while (attempts[-1].foreign_load or 0.0) > QUIET_LOAD and len(attempts) <= retries:
                if log:
                    busy = attempts[-1].foreign_load
                    print(f"  round {r + 1} {side:>10}: contended (foreign load {busy:.2f}), again", flush=True)
                attempts.append(run_worker(script, side, case, threads))
            run = min(attempts, key=lambda a: a.foreign_load or 0.0)
            runs[side].append(run)
            if log:
                shown = ", ".join(f"{v:.4g}" for v in run.values[:8])
                load = "" if run.foreign_load is None else f"  foreign load {run.foreign_load:.2f}"
                print(f"  round {r + 1} {side:>10}: [{shown}]  peak {run.peak_mb:.0f} MB{load}", flush=True)
    return {s: summarise(rs) for s, rs in runs.items()}


@dataclass
class CaseResult:
    """One benchmark case: settings, both sides' summaries, and the ratio."""

    name: str
    size: str
    settings: dict[str, Any]
    unit: str
    """'s' (seconds per step, lower is better) or a rate such as 'tokens/s' (higher is better)."""
    sides: dict[str, SideSummary]
    baseline: str = "trl"
    """The side the ratio compares against (TRL, or transformers generate, or the naive path)."""
    ours: str = "posttrain"
    notes: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        """baseline time / our time (> 1: ours is faster), from wall-time medians, whatever the unit."""
        return _ratio(self.sides[self.ours].median, self.sides[self.baseline].median, self.unit)

    @property
    def cpu_speedup(self) -> float | None:
        """The same from process-CPU-time medians (None when a side did not measure CPU time)."""
        a, b = self.sides[self.ours].cpu_median, self.sides[self.baseline].cpu_median
        return None if a is None or b is None else _ratio(a, b, self.unit)


def _ratio(ours: float, baseline: float, unit: str) -> float:
    return baseline / ours if unit == "s" else ours / baseline


def stored(case: CaseResult) -> dict[str, Any]:
    return {**asdict(case), "speedup": case.speedup, "cpu_speedup": case.cpu_speedup}


def write_json(path: Path | None, script: str, cases: list[CaseResult], extra: dict[str, Any] | None = None) -> Path:
    path = path or OUT_DIR / f"{Path(script).stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "script": Path(script).name,
        "command": command_line(),
        "machine": machine(),
        "cases": [stored(c) for c in cases],
        **(extra or {}),
    }
    path.write_text(json.dumps(doc, indent=1))
    return path


def fmt(value: float, unit: str) -> str:
    if value != value:  # NaN
        return "-"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def table(cases: list[dict[str, Any]]) -> str:
    """Markdown table of cases (as stored in the JSON): both sides' median (min-max), ratio, memory."""
    head = (
        "| case | size | ours: median (min-max) | baseline: median (min-max) | speed-up | CPU-time speed-up | "
        "ours peak MB | baseline peak MB | foreign load |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for c in cases:
        ours, base = c["sides"][c["ours"]], c["sides"][c["baseline"]]
        unit = c["unit"]
        loads = [s["foreign_load"] for s in (ours, base) if s["foreign_load"] is not None]

        def cell(s: dict[str, Any], name: str, unit: str = unit) -> str:
            return f"{name}: {fmt(s['median'], unit)} ({fmt(s['min'], unit)}-{fmt(s['max'], unit)})"

        load = f"{max(loads):.2f}" if loads else "-"
        cpu = f"{c['cpu_speedup']:.2f}x" if c.get("cpu_speedup") else "-"
        rows.append(
            f"| {c['name']} | {c['size']} | {cell(ours, c['ours'])} | {cell(base, c['baseline'])} | "
            f"**{c['speedup']:.2f}x** | {cpu} | {ours['peak_mb']:.0f} | {base['peak_mb']:.0f} | {load} |"
        )
    return head + "\n".join(rows) + "\n"


def print_cases(cases: list[CaseResult]) -> None:
    print()
    print(table([stored(c) for c in cases]))
    for c in cases:
        for note in c.notes:
            print(f"- {c.name} ({c.size}): {note}")
