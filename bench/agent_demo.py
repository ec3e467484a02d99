"""The agents demo (issue #23.8): GRPO teaches the tiny model to call the calculator for multiplication it cannot do
alone, warm-started from a few hundred tool-use demonstrations; and the guess-the-number game.

    python bench/agent_demo.py                     # seeds 0 1 2, both parts
    python bench/agent_demo.py --seeds 0 --part calculator

Calculator, per seed (recipes/arith-tools-sft.yaml then recipes/arith-tools-grpo.yaml, with the seed): SFT on 400
demonstrations of 1-3 digit multiplication, half calling the calculator, half answering directly; GRPO in the
calculator environment rewarded for the right final answer only. Measured on 200 held-out problems, greedy, in
the calculator environment: accuracy, the share of episodes that call the calculator, tool calls and model turns
per episode; before GRPO (the warm start) and after; and the accuracy of a model of the same SFT on direct answers
only (what the model does alone).

Guess-the-number, per seed: SFT on binary-search games (secret in 1..16, replies higher/lower), then GRPO with the
game's own reward (1 when guessed within 5 turns); solved share, guesses per game, before and after.

Writes bench/agent_demo.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RECIPES = HERE.parent / "recipes"


def calculator_seed(seed: int, out: Path, rl_steps: int | None) -> dict[str, Any]:
    from posttrain import api
    from posttrain.config import RLConfig
    from posttrain.envs import EpisodeLimits, build_environments
    from posttrain.rewards import load_reward_fn
    from posttrain.trainers.evaluation import evaluate
    from posttrain.trainers.splits import load_prompts

    started = time.perf_counter()
    common = [f"seed={seed}"]
    direct = api.sft(RECIPES / "arith-tools-sft.yaml", overrides=[*common, f"output_dir={out}/direct",
                                                                 "data.task.tool_fraction=0.0"], progress=False)
    sft = api.sft(RECIPES / "arith-tools-sft.yaml", overrides=[*common, f"output_dir={out}/sft"], progress=False)
    sft_s = time.perf_counter() - started
    overrides = [*common, f"output_dir={out}/grpo", f"model.path={out}/sft/final"]
    overrides += [f"train.max_steps={rl_steps}"] if rl_steps else []
    cfg = api.as_config(RLConfig, RECIPES / "arith-tools-grpo.yaml", overrides)
    env = build_environments(cfg.env, tokenizer=sft.tokenizer, base_dir=cfg.recipe_dir)
    limits = EpisodeLimits(max_turns=cfg.env.max_turns)
    prompts, _ = load_prompts(cfg.data, sft.tokenizer, "eval", seed=seed, recipe_dir=cfg.recipe_dir)
    reward = load_reward_fn("numeric_match")

    def measure(model: Any, tokenizer: Any, environment: Any = env) -> dict[str, float]:
        result = evaluate(model, tokenizer, prompts, reward, max_new_tokens=32, environment=environment,
                          limits=limits)  # fmt: skip
        calls = [int(e.get("tool_calls", 0)) for e in result.examples]
        return {"accuracy": result.greedy_accuracy, "calls_tool": sum(c > 0 for c in calls) / len(calls),
                **result.episodes}  # fmt: skip

    alone = evaluate(direct.model, direct.tokenizer, prompts, reward, max_new_tokens=32).greedy_accuracy
    before = measure(sft.model, sft.tokenizer)
    rl_started = time.perf_counter()
    grpo = api.rl(cfg, progress=False)
    rl_s = time.perf_counter() - rl_started
    after = measure(grpo.model, grpo.tokenizer)
    return {"seed": seed, "alone": alone, "before": before, "after": after, "sft_s": sft_s, "rl_s": rl_s,
            "seconds": time.perf_counter() - started}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rl-steps", type=int, default=None)
    parser.add_argument("--output-dir", default="runs/agent-demo")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    random.seed(0)
    rows = [calculator_seed(seed, Path(args.output_dir) / f"calculator-seed{seed}", args.rl_steps)
            for seed in args.seeds]  # fmt: skip
    (HERE / "agent_demo.json").write_text(json.dumps(rows, indent=1))
    print(calculator_table(rows))


def calculator_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| seed | alone (direct SFT) | warm start: accuracy, calls the tool, turns | after GRPO: accuracy, "
             "calls the tool, turns | GRPO s |", "|---|---|---|---|---|"]  # fmt: skip

    def cells(m: dict[str, float]) -> str:
        return f"{m['accuracy']:.1%}, {m['calls_tool']:.0%}, {m.get('turns', 0):.2f}"

    for r in rows:
        lines.append(f"| {r['seed']} | {r['alone']:.1%} | {cells(r['before'])} | {cells(r['after'])} | "
                     f"{r['rl_s']:.0f} |")  # fmt: skip
    mean = {k: statistics.mean(r[k] for r in rows) for k in ("alone", "rl_s")}
    mean_before = {k: statistics.mean(r["before"].get(k, 0) for r in rows) for k in ("accuracy", "calls_tool", "turns")}
    mean_after = {k: statistics.mean(r["after"].get(k, 0) for r in rows) for k in ("accuracy", "calls_tool", "turns")}
    lines.append(f"| mean | {mean['alone']:.1%} | {cells(mean_before)} | {cells(mean_after)} | {mean['rl_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
