"""The agents demo (issue #23.8): GRPO teaches the tiny model to call the calculator for multiplication it cannot do
alone, warm-started from a few tool-use demonstrations; and the guess-the-number game with turn-level credit.

    python bench/agent_demo.py                     # seeds 0 1 2, both parts
    python bench/agent_demo.py --seeds 0 --part calculator

Calculator, per seed (recipes/arith-tools-sft.yaml then recipes/arith-tools-grpo.yaml, with the seed): SFT on
demonstrations of multiplication, a share calling the calculator and answering with its result, the rest answering
directly; GRPO in the calculator environment rewarded for the right final answer only. Measured greedy on the
held-out problems in the calculator environment: accuracy, the share of episodes that call the calculator, tool calls
and model turns per episode; before GRPO (the warm start) and after; and the accuracy of the same SFT on direct
answers only (what the model does alone).

Guess-the-number, per seed (recipes/guess-number-sft.yaml then recipes/guess-number-grpo.yaml): SFT on games over
1..16, a share played by binary search, the rest counting up; GRPO with the game's reward and `turn_returns` credit.
Measured greedy on each of the 16 games: the share solved within 5 guesses and the guesses per game, before and
after.

Times: wall and process CPU time (all of the process's threads) of each stage; the machine may be shared.
Writes bench/agent_demo.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RECIPES = HERE.parent / "recipes"


class Clock:
    """Wall and process CPU seconds since the last `lap`."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> dict[str, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        out = {"wall_s": wall - self.wall, "cpu_s": cpu - self.cpu}
        self.wall, self.cpu = wall, cpu
        return out


def measure(recipe: str, overrides: list[str], model: Any, tokenizer: Any, *, seed: int,
            environment: bool = True) -> dict[str, float]:  # fmt: skip
    """Greedy held-out accuracy in the recipe's environment (single-turn when `environment` is false), the share of
    episodes that call a tool, and the episodes' mean counts (turns, tool calls, guesses, ...)."""
    from posttrain import api
    from posttrain.config import RLConfig
    from posttrain.envs import build_environments
    from posttrain.envs.single_turn import SingleTurnEnv
    from posttrain.rewards import load_reward_fn
    from posttrain.trainers.evaluation import evaluate
    from posttrain.trainers.rl import episode_limits
    from posttrain.trainers.splits import load_prompts

    cfg = api.as_config(RLConfig, RECIPES / recipe, overrides)
    env = build_environments(cfg.env, tokenizer=tokenizer, base_dir=cfg.recipe_dir) if environment else SingleTurnEnv
    prompts, _ = load_prompts(cfg.data, tokenizer, "eval", seed=seed, recipe_dir=cfg.recipe_dir)
    reward = load_reward_fn(cfg.eval.reward)
    result = evaluate(model, tokenizer, prompts, reward, max_new_tokens=cfg.eval.max_new_tokens, environment=env,
                      limits=episode_limits(cfg.env))  # fmt: skip
    calls = [int(e.get("tool_calls", 0)) for e in result.examples]
    return {"accuracy": result.greedy_accuracy, "calls_tool": sum(c > 0 for c in calls) / len(calls),
            "examples": float(result.num_prompts), **result.episodes}  # fmt: skip


def calculator_seed(seed: int, out: Path, rl_steps: int | None) -> dict[str, Any]:
    from posttrain import api

    clock = Clock()
    common = [f"seed={seed}"]
    direct = api.sft(RECIPES / "arith-tools-sft.yaml", overrides=[*common, f"output_dir={out}/direct",
                                                                 "data.task.tool_fraction=0.0"], progress=False)
    direct_time = clock.lap()
    sft = api.sft(RECIPES / "arith-tools-sft.yaml", overrides=[*common, f"output_dir={out}/sft"], progress=False)
    sft_time = clock.lap()
    overrides = [*common, f"output_dir={out}/grpo", f"model.path={out}/sft/final"]
    overrides += [f"train.max_steps={rl_steps}"] if rl_steps else []
    alone = measure("arith-tools-grpo.yaml", overrides, direct.model, direct.tokenizer, seed=seed, environment=False)
    before = measure("arith-tools-grpo.yaml", overrides, sft.model, sft.tokenizer, seed=seed)
    clock.lap()
    grpo = api.rl(RECIPES / "arith-tools-grpo.yaml", overrides=overrides, progress=False)
    rl_time = clock.lap()
    after = measure("arith-tools-grpo.yaml", overrides, grpo.model, grpo.tokenizer, seed=seed)
    return {"seed": seed, "alone": alone, "before": before, "after": after, "direct_sft": direct_time,
            "sft": sft_time, "grpo": rl_time}  # fmt: skip


def guess_seed(seed: int, out: Path, rl_steps: int | None) -> dict[str, Any]:
    from posttrain import api

    clock = Clock()
    common = [f"seed={seed}"]
    sft = api.sft(RECIPES / "guess-number-sft.yaml", overrides=[*common, f"output_dir={out}/sft"], progress=False)
    sft_time = clock.lap()
    overrides = [*common, f"output_dir={out}/grpo", f"model.path={out}/sft/final"]
    overrides += [f"train.max_steps={rl_steps}"] if rl_steps else []
    before = measure("guess-number-grpo.yaml", overrides, sft.model, sft.tokenizer, seed=seed)
    clock.lap()
    grpo = api.rl(RECIPES / "guess-number-grpo.yaml", overrides=overrides, progress=False)
    rl_time = clock.lap()
    after = measure("guess-number-grpo.yaml", overrides, grpo.model, grpo.tokenizer, seed=seed)
    return {"seed": seed, "before": before, "after": after, "sft": sft_time, "grpo": rl_time}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--part", choices=("calculator", "guess", "both"), default="both")
    parser.add_argument("--rl-steps", type=int, default=None, help="GRPO steps instead of the recipes'")
    parser.add_argument("--output-dir", default="runs/agent-demo")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=HERE / "agent_demo.json")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    results: dict[str, Any] = json.loads(args.json.read_text()) if args.json.exists() else {}
    results["command"] = "python bench/agent_demo.py " + " ".join(
        [f"--seeds {' '.join(map(str, args.seeds))}", f"--part {args.part}", f"--threads {args.threads}",
         *([f"--rl-steps {args.rl_steps}"] if args.rl_steps else [])])  # fmt: skip
    results["loadavg_start"] = os.getloadavg()
    if args.part in ("calculator", "both"):
        results["calculator"] = [calculator_seed(s, out / f"calculator-seed{s}", args.rl_steps) for s in args.seeds]
        args.json.write_text(json.dumps(results, indent=1))
        print(calculator_table(results["calculator"]), flush=True)
    if args.part in ("guess", "both"):
        results["guess"] = [guess_seed(s, out / f"guess-seed{s}", args.rl_steps) for s in args.seeds]
        args.json.write_text(json.dumps(results, indent=1))
        print(guess_table(results["guess"]), flush=True)
    results["loadavg_end"] = os.getloadavg()
    args.json.write_text(json.dumps(results, indent=1))


def times(r: dict[str, Any], *stages: str) -> str:
    wall = sum(r[s]["wall_s"] for s in stages)
    cpu = sum(r[s]["cpu_s"] for s in stages)
    return f"{wall:.0f} s ({cpu:.0f} s CPU)"


def calculator_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| seed | alone (SFT on direct answers) | warm start: accuracy, calls the calculator, turns | after GRPO: "
             "accuracy, calls the calculator, turns | SFT time | GRPO time |", "|---|---|---|---|---|---|"]  # fmt: skip

    def cells(m: dict[str, float]) -> str:
        return f"{m['accuracy']:.1%}, {m['calls_tool']:.0%}, {m.get('turns', 1.0):.2f}"

    for r in rows:
        lines.append(f"| {r['seed']} | {r['alone']['accuracy']:.1%} | {cells(r['before'])} | {cells(r['after'])} | "
                     f"{times(r, 'sft')} | {times(r, 'grpo')} |")  # fmt: skip
    mean = {part: {k: statistics.mean(r[part].get(k, 1.0) for r in rows) for k in ("accuracy", "calls_tool", "turns")}
            for part in ("alone", "before", "after")}  # fmt: skip
    lines.append(f"| mean | {mean['alone']['accuracy']:.1%} | {cells(mean['before'])} | {cells(mean['after'])} | | |")
    return "\n".join(lines)


def guess_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| seed | warm start: solved, guesses per game | after GRPO: solved, guesses per game | SFT time | "
             "GRPO time |", "|---|---|---|---|---|"]  # fmt: skip

    def cells(m: dict[str, float]) -> str:
        return f"{m['accuracy']:.1%}, {m.get('guesses', 0.0):.2f}"

    for r in rows:
        lines.append(f"| {r['seed']} | {cells(r['before'])} | {cells(r['after'])} | {times(r, 'sft')} | "
                     f"{times(r, 'grpo')} |")  # fmt: skip
    mean = {part: {k: statistics.mean(r[part].get(k, 0.0) for r in rows) for k in ("accuracy", "guesses")}
            for part in ("before", "after")}  # fmt: skip
    lines.append(f"| mean | {cells(mean['before'])} | {cells(mean['after'])} | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
