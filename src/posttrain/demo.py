"""`posttrain demo`: the whole pipeline on this laptop-sized CPU, with nothing downloaded.

1. build the arithmetic tokenizer and a tiny Qwen2-style model from a preset;
2. measure held-out greedy accuracy of the untrained model;
3. supervised fine-tuning on arithmetic demonstrations, 30% of which work the sum out column by column
   in `<think>...</think>` before the answer, the rest stating the answer alone; held-out greedy
   accuracy again, and the share of greedy answers that think first;
4. GRPO from the SFT model against the answer verifier, then the same two measures a third time;
5. write demo.json.

The SFT model has learned both ways of answering and, greedily, mostly answers directly, which is right
far less often than working it out. GRPO, rewarded only for the right final answer, finds that out and
moves the policy to thinking first (docs/online-rl.md, "What the demo shows").
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from posttrain.api import evaluate, rl, sft
from posttrain.policies import build_model
from posttrain.tasks import build_builtin_tokenizer
from posttrain.tasks.arithmetic import THINK_OPEN
from posttrain.trainers.evaluation import EvalResult

TASK = {
    "name": "arithmetic",
    "digits": 2,
    "operators": "+-",
    "train_size": 20000,
    "eval_size": 300,
    "think_fraction": 0.3,
}
PRESET = "qwen2-small"
MAX_LENGTH, MAX_NEW_TOKENS = 48, 32  # the longest worked completion is 27 tokens
SFT_TRAIN = {"max_steps": 2000, "batch_size": 64, "lr": 3e-3, "warmup_steps": 50, "schedule": "cosine"}
# GRPO (arXiv:2402.03300) with a small k3 KL penalty in the loss.
RL_TRAIN = {"max_steps": 60, "lr": 2e-4}
RL = {
    "prompts_per_step": 32,
    "group_size": 8,
    "sampling": {"temperature": 1.0, "max_new_tokens": MAX_NEW_TOKENS},
    "advantage": "grpo",
    "policy_loss": "ppo",
    "loss_aggregation": "seq_mean_token_mean",
    "kl": {"estimator": "k3", "coef": 0.01},
}


@dataclass
class DemoResult:
    accuracy_before: float
    accuracy_after_sft: float
    accuracy_after_rl: float
    thinks_after_sft: float
    """Share of held-out greedy completions that work the problem out in `<think>` first."""
    thinks_after_rl: float
    seconds: float
    output_dir: str


def run_demo(
    output_dir: str | Path = "runs/demo", seed: int = 0, *, sft_steps: int | None = None, rl_steps: int | None = None
) -> DemoResult:
    started = time.perf_counter()
    out = Path(output_dir)
    console = Console()
    tokenizer = build_builtin_tokenizer("arithmetic")
    model = build_model(PRESET, tokenizer, seed=seed)
    params = sum(p.numel() for p in model.parameters())
    console.print(
        f"[bold]posttrain demo[/]: {PRESET} ({params / 1e6:.2f}M parameters), task {_describe(TASK)}"
    )

    before = _evaluate(model, tokenizer, out / "eval-before", seed).greedy_accuracy
    console.print(f"held-out greedy accuracy before training: {before:.1%}")

    train = {**SFT_TRAIN, "max_steps": sft_steps or SFT_TRAIN["max_steps"]}
    sft_config = {
        "model": {"preset": PRESET, "tokenizer": "arithmetic"},
        "data": {"task": TASK, "max_length": MAX_LENGTH},
        "train": train,
        "eval": {"max_new_tokens": MAX_NEW_TOKENS},
        "output_dir": str(out / "sft"),
        "seed": seed,
    }
    result = sft(sft_config, model=model, tokenizer=tokenizer)
    after_sft = result.eval  # SFT's final evaluation: the same held-out problems, greedy, as _evaluate
    console.print(
        f"held-out greedy accuracy after SFT: {after_sft.greedy_accuracy:.1%}"
        f" ({thinks(after_sft):.0%} of greedy answers think first)"
    )

    rl_config = {
        "model": {"preset": PRESET, "tokenizer": "arithmetic"},
        "data": {"task": TASK, "max_length": MAX_LENGTH},
        "train": {**RL_TRAIN, "max_steps": rl_steps or RL_TRAIN["max_steps"]},
        "eval": {"max_new_tokens": MAX_NEW_TOKENS},
        "rewards": [{"fn": "numeric_match"}],
        "rl": RL,
        "output_dir": str(out / "rl"),
        "seed": seed,
    }
    after_rl = rl(rl_config, model=result.model, tokenizer=tokenizer).eval

    seconds = time.perf_counter() - started
    summary = DemoResult(
        accuracy_before=before,
        accuracy_after_sft=after_sft.greedy_accuracy,
        accuracy_after_rl=after_rl.greedy_accuracy,
        thinks_after_sft=thinks(after_sft),
        thinks_after_rl=thinks(after_rl),
        seconds=seconds,
        output_dir=str(out),
    )
    _print_summary(console, summary)
    (out / "demo.json").write_text(json.dumps(asdict(summary), indent=1))
    return summary


def _evaluate(model: Any, tokenizer: Any, output_dir: Path, seed: int) -> EvalResult:
    config = {
        "model": {"preset": PRESET, "tokenizer": "arithmetic"},
        "data": {"task": TASK},
        "eval": {"max_new_tokens": MAX_NEW_TOKENS},
        "output_dir": str(output_dir),
        "seed": seed,
    }
    return evaluate(config, model=model, tokenizer=tokenizer)


def thinks(result: EvalResult) -> float:
    """Share of the greedy completions that open with a `<think>` block."""
    return sum(e["completion"].lstrip().startswith(THINK_OPEN) for e in result.examples) / max(1, len(result.examples))


def _print_summary(console: Console, result: DemoResult) -> None:
    table = Table(title="held-out greedy accuracy")
    table.add_column("stage")
    table.add_column("accuracy", justify="right")
    table.add_column("thinks first", justify="right")
    table.add_row("before training", f"{result.accuracy_before:.1%}", "")
    table.add_row("after SFT", f"{result.accuracy_after_sft:.1%}", f"{result.thinks_after_sft:.0%}")
    table.add_row("after SFT + GRPO", f"{result.accuracy_after_rl:.1%}", f"{result.thinks_after_rl:.0%}")
    console.print(table)
    console.print(f"done in {result.seconds:.0f} s; outputs in {result.output_dir}")


def _describe(task: dict[str, Any]) -> str:
    return (
        f"{task['name']} ({task['digits']} digits, operators {task['operators']},"
        f" {task['think_fraction']:.0%} of demonstrations think first)"
    )
