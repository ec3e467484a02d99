"""Learning suite (issue #29, items 1-3): held-out greedy accuracy before and after each post-training method, with
posttrain's defaults and with TRL 1.16's defaults for the same method, from the same SFT models, on small
verifiable tasks the defaults were not tuned on. Off CI; bench/RESULTS.md ("Learning suite") records what ran.

    python bench/learning_suite.py --quick                      # 1 task, 1 setting, 3 methods, 3 seeds, both sides
    python bench/learning_suite.py                              # the full grid (see --estimate for its time)
    python bench/learning_suite.py --tasks sort --settings low --methods grpo dpo --seeds 0
    python bench/learning_suite.py --table                      # the table of what bench/learning_suite.json holds
    python bench/learning_suite.py --estimate                   # the full grid's time from the runs measured so far

For each task (`posttrain.tasks`: reverse, sort, count, sequence) and seed S:

1. SFT (posttrain, constant lr) of a new `qwen2-small` model with the `characters` tokenizer on the task's
   demonstrations, `WRONG_FRACTION` of which state a near miss (noisy demonstrations). The checkpoint after
   `SFT_STEPS[task]["low"]` steps is the low start (about 20-50% held-out), the final model the high start (80%+).
2. From each start, every method on both sides (`--sides`): online RL (GRPO, DAPO, Dr. GRPO, RLOO), offline
   preference losses (DPO, IPO, RPO, DPO-Positive, SimPO, KTO) on pairs of both kinds (`near_duplicate`: the
   rejected answer one token or one swap from the chosen; `different`: clearly different), and online DPO. The
   optimisation budget is the same on both sides (`RL_BUDGET`, `PREF_BUDGET`, `ONLINE_BUDGET`: steps, batch,
   learning rate, constant schedule, sampling); the method's settings are each library's defaults for it
   (`METHODS`: posttrain's config with only the method named, TRL's config with only the method named, both as the
   papers define DAPO, Dr. GRPO and RLOO).
3. Held-out greedy accuracy of the start and of every result on the same `EVAL_SIZE` held-out problems of seed S,
   by one function (`posttrain.evaluate`, the task's verifier), whichever library trained the model.

Every run is one fresh worker process with one torch thread (DESIGN.md: threads on a shared 2-core machine);
results go to bench/learning_suite.json as they come, and a cell already there is not run again (the script
resumes). Per cell the table gives the mean and spread over seeds and AdaStop's verdict (`posttrain compare`'s test,
`report.compare.compare_values`, one interim of all the cell's seeds, family-wise error 0.05) on two questions:
does the method's held-out accuracy differ from its SFT start's, and does posttrain's differ from TRL's. The TRL side
runs by default only where trl is installed (`pip install 'posttrain[bench]'`: trl 1.16).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

ROOT = harness.ROOT
RESULTS = ROOT / "bench" / "learning_suite.json"
RUNS = ROOT / "runs" / "suite"

TASKS = ("reverse", "sort", "count", "sequence")
WRONG_FRACTION = 0.2
"""Share of SFT demonstrations that state a near miss (the user's noisy data)."""
SFT_STEPS = {
    "reverse": {"low": 60, "high": 480},
    "sort": {"low": 60, "high": 480},
    "count": {"low": 60, "high": 480},
    "sequence": {"low": 60, "high": 480},
}
"""SFT steps of 64 demonstrations (lr 3e-3, constant after 20 warm-up steps) that leave each start; `high` is a
multiple of `low`, whose checkpoint is the low start. Measured for sort only (bench/RESULTS.md, "Learning suite");
the other tasks use sort's until their starts are measured."""
SFT = {"batch_size": 64, "lr": 3e-3, "warmup_steps": 20, "schedule": "constant"}
EVAL_SIZE = 500
MAX_NEW_TOKENS = 8
MAX_LENGTH = 32

RL_BUDGET = {"max_steps": 50, "lr": 2e-4, "prompts_per_step": 16, "group_size": 8, "temperature": 1.0}
"""Online RL, both sides: 50 steps of 16 prompts x 8 samples (temperature 1, up to 8 new tokens), lr 2e-4 constant
(the shipped arith-grpo recipe's lr for this model), AdamW, no weight decay, gradient norm 1.0."""
PREF_BUDGET = {"max_steps": 100, "batch_size": 64, "lr": 1e-4}
"""Offline preference, both sides: 100 steps of 64 pairs (6,400 pairs, one epoch; KTO: 64 labelled completions),
lr 1e-4 constant (the shipped arith-pref-base recipe's lr)."""
ONLINE_BUDGET = {"max_steps": 100, "prompts": 64, "lr": 1e-4}
"""Online DPO, both sides: 100 steps, each sampling 2 completions (temperature 1) for 64 fresh prompts."""

METHODS: dict[str, dict[str, Any]] = {
    # online RL: posttrain config sections / TRL trainer and its config
    "grpo": {"kind": "rl", "posttrain": {}, "trl": ("grpo", {})},
    "dapo": {"kind": "rl",
             "posttrain": {"rl": {"policy_loss_args": {"clip_low": 0.2, "clip_high": 0.28}, "dynamic_sampling": True,
                                  "loss_aggregation": "token_mean", "kl": {"coef": 0.0}},
                           "overlong": True},
             "trl": ("grpo", {"loss_type": "dapo", "epsilon": 0.2, "epsilon_high": 0.28,
                              "mask_truncated_completions": True, "beta": 0.0, "overlong": True})},
    "dr_grpo": {"kind": "rl",
                "posttrain": {"rl": {"advantage_args": {"scale_std": False},
                                     "loss_aggregation": "seq_mean_token_sum_norm", "kl": {"coef": 0.0}}},
                "trl": ("grpo", {"loss_type": "dr_grpo", "scale_rewards": "none", "beta": 0.0})},
    "rloo": {"kind": "rl",
             "posttrain": {"rl": {"advantage": "rloo", "kl": {"estimator": "k1", "coef": 0.05, "in_reward": True}}},
             "trl": ("rloo", {})},
    # offline preference: pref.loss (its own defaults) / TRL
    "dpo": {"kind": "pairs", "posttrain": {"loss": "dpo"}, "trl": ("dpo", {})},
    "ipo": {"kind": "pairs", "posttrain": {"loss": "ipo"}, "trl": ("dpo", {"loss_type": ["ipo"]})},
    "rpo": {"kind": "pairs", "posttrain": {"loss": "rpo"}, "trl": ("dpo", {"loss_type": ["sigmoid", "sft"]})},
    "dpop": {"kind": "pairs", "posttrain": {"loss": "dpop"}, "trl": None},
    "simpo": {"kind": "pairs", "posttrain": {"loss": "simpo", "reference": "none"},
              "trl": ("cpo", {"loss_type": "simpo", "cpo_alpha": 0.0})},
    "kto": {"kind": "unpaired", "posttrain": {"loss": "kto"}, "trl": ("kto", {})},
    "online_dpo": {"kind": "online", "posttrain": {"loss": "dpo"}, "trl": ("online_dpo", {})},
}  # fmt: skip
"""Each method as each library runs it with only the method named. TRL: GRPO's defaults (loss_type dapo, group
scaling, eps 0.2, beta 0); DAPO and Dr. GRPO as TRL's paper index configures them (Dr. GRPO with scale_rewards none,
the paper's unscaled advantage); RLOOTrainer's defaults (beta 0.05, KL in the reward); DPOTrainer with loss_type
sigmoid / ipo / [sigmoid, sft] (RPO: NLL weight 1, the paper's alpha); SimPO as CPOTrainer(loss_type simpo,
cpo_alpha 0); KTOTrainer; OnlineDPOTrainer with the verifier as reward function. TRL 1.16 has no DPO-Positive."""
QUICK = {"tasks": ["sort"], "settings": ["low"], "methods": ["grpo", "dpo", "rpo"], "pairs": ["near_duplicate"]}
PAIR_KINDS = ("near_duplicate", "different")


# --- the grid -------------------------------------------------------------------------------------------------


def cells(tasks: list[str], settings: list[str], methods: list[str], pairs: list[str], seeds: list[int],
          sides: list[str]) -> list[dict[str, Any]]:  # fmt: skip
    """Every run of the grid, SFT first per (task, seed)."""
    out = []
    for task in tasks:
        for seed in seeds:
            out.append({"job": "sft", "task": task, "seed": seed})
            for setting in settings:
                for method in methods:
                    kinds = pairs if METHODS[method]["kind"] in ("pairs", "unpaired") else ["-"]
                    for kind in kinds:
                        for side in sides:
                            if side == "trl" and METHODS[method]["trl"] is None:
                                continue
                            out.append({"job": "train", "task": task, "seed": seed, "setting": setting,
                                        "method": method, "pairs": kind, "side": side})  # fmt: skip
    return out


def key_of(cell: dict[str, Any]) -> str:
    if cell["job"] == "sft":
        return f"{cell['task']}/sft/s{cell['seed']}"
    return f"{cell['task']}/{cell['setting']}/{cell['method']}/{cell['pairs']}/{cell['side']}/s{cell['seed']}"


def sft_dir(task: str, seed: int) -> Path:
    return RUNS / task / f"s{seed}" / "sft"


def start_dir(task: str, seed: int, setting: str) -> Path:
    root = sft_dir(task, seed)
    low = root / "checkpoints" / f"step-{SFT_STEPS[task]['low']:08d}" / "model"
    return root / "final" if setting == "high" else low


def run_dir(cell: dict[str, Any]) -> Path:
    name = f"{cell['method']}-{cell['pairs']}-{cell['side']}"
    return RUNS / cell["task"] / f"s{cell['seed']}" / cell["setting"] / name


# --- worker: one run ------------------------------------------------------------------------------------------


def held_out_accuracy(model_dir: Path, task: str, seed: int) -> float:
    from posttrain.api import evaluate

    config = {"model": {"path": str(model_dir)}, "data": {"task": {"name": task, "eval_size": EVAL_SIZE}},
              "eval": {"max_new_tokens": MAX_NEW_TOKENS}, "output_dir": str(model_dir.parent / "eval"),
              "seed": seed}  # fmt: skip
    return evaluate(config).greedy_accuracy


def run_sft(cell: dict[str, Any]) -> dict[str, Any]:
    from posttrain.api import sft
    from posttrain.tasks import TASKS

    task, seed, steps = cell["task"], cell["seed"], SFT_STEPS[cell["task"]]
    out = sft_dir(task, seed)
    shutil.rmtree(out, ignore_errors=True)
    rows = TASKS[task](wrong_fraction=WRONG_FRACTION).sample(20000, seed=seed)
    config = {"model": {"preset": "qwen2-small", "tokenizer": "characters"}, "data": {"max_length": MAX_LENGTH},
              "train": {**SFT, "max_steps": steps["high"], "save_every": steps["low"],
                        "keep_last": steps["high"] // steps["low"] + 1},
              "output_dir": str(out), "seed": seed}  # fmt: skip
    started = time.perf_counter()
    sft(config, train=rows, progress=False)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, **{f"accuracy_{s}": held_out_accuracy(start_dir(task, seed, s), task, seed)
                                   for s in ("low", "high")}}  # fmt: skip


def verifier_reward(task: str) -> Any:
    """The task's verifier as a TRL-style reward function (None, not applicable, scores 0)."""
    from posttrain.rewards import load_reward_fn
    from posttrain.tasks import verifier_of

    verify = load_reward_fn(verifier_of(task))

    def correct(prompts: list[Any], completions: list[Any], answer: list[str], **kwargs: Any) -> list[float]:
        return [s or 0.0 for s in verify(completions=[str(c) for c in completions], answer=answer)]

    correct.__name__ = "correct"
    return correct


def training_rows(cell: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's rows from the task's training split: prompts with answers (online), pairs or labelled
    completions (offline)."""
    from posttrain.tasks import TASKS
    from posttrain.tasks.preference_data import feedback_rows

    task, kind = TASKS[cell["task"]](), METHODS[cell["method"]]["kind"]
    seed = 1000 + cell["seed"]  # other problems than the SFT run's first ones, of the same training split
    if kind in ("rl", "online"):
        budget = (RL_BUDGET["max_steps"], RL_BUDGET["prompts_per_step"]) if kind == "rl" else (
            ONLINE_BUDGET["max_steps"], ONLINE_BUDGET["prompts"])
        problems = task.sample(2 * budget[0] * budget[1], seed=seed)
        return [{"prompt": r["prompt"], "answer": r["answer"]} for r in problems]
    n = PREF_BUDGET["max_steps"] * PREF_BUDGET["batch_size"]
    data = "unpaired" if kind == "unpaired" else "preference"
    rows = feedback_rows(task, n // 2 if kind == "unpaired" else n, seed=seed, split="train", kind=data,
                         rejected=cell["pairs"])  # fmt: skip
    return [{k: v for k, v in r.items() if k != "answer"} for r in rows]


def posttrain_config(cell: dict[str, Any], start: Path, out: Path) -> dict[str, Any]:
    method = METHODS[cell["method"]]
    common = {"model": {"path": str(start)}, "data": {"max_length": MAX_LENGTH}, "output_dir": str(out),
              "seed": cell["seed"]}  # fmt: skip
    if method["kind"] == "rl":
        extra = dict(method["posttrain"])
        rewards = [{"fn": verifier_name(cell["task"])}]
        if extra.pop("overlong", False):  # DAPO's soft overlong punishment, L_cache 25% of L_max (arith-dapo)
            rewards.append({"fn": "overlong_penalty", "args": {"max_new_tokens": MAX_NEW_TOKENS, "overlong_buffer": 2}})
        rl = {"prompts_per_step": RL_BUDGET["prompts_per_step"], "group_size": RL_BUDGET["group_size"],
              "sampling": {"temperature": RL_BUDGET["temperature"], "max_new_tokens": MAX_NEW_TOKENS},
              **extra.get("rl", {})}  # fmt: skip
        train = {"max_steps": RL_BUDGET["max_steps"], "lr": RL_BUDGET["lr"], "schedule": "constant"}
        return {**common, "train": train, "rl": rl, "rewards": rewards}
    pref = dict(method["posttrain"])
    if method["kind"] == "online":
        budget = ONLINE_BUDGET
        train = {"max_steps": budget["max_steps"], "batch_size": budget["prompts"], "lr": budget["lr"],
                 "warmup_steps": 0, "schedule": "constant"}  # fmt: skip
        online = {"rewards": [{"fn": verifier_name(cell["task"])}], "prompts_per_round": budget["prompts"],
                  "samples_per_prompt": 2, "steps_per_round": 1,
                  "sampling": {"temperature": RL_BUDGET["temperature"], "max_new_tokens": MAX_NEW_TOKENS}}
        return {**common, "train": train, "pref": pref, "online": online}
    train = {"max_steps": PREF_BUDGET["max_steps"], "batch_size": PREF_BUDGET["batch_size"], "lr": PREF_BUDGET["lr"],
             "warmup_steps": 0, "schedule": "constant"}  # fmt: skip
    return {**common, "train": train, "pref": pref}


def verifier_name(task: str) -> str:
    from posttrain.tasks import verifier_of

    return verifier_of(task)


def run_posttrain(cell: dict[str, Any], start: Path, out: Path) -> Path:
    from posttrain import api

    config = posttrain_config(cell, start, out)
    train = api.rl if METHODS[cell["method"]]["kind"] == "rl" else api.pref
    return Path(train(config, train=training_rows(cell), progress=False).final_dir)


def trl_common(cell: dict[str, Any], out: Path, *, lr: float, steps: int) -> dict[str, Any]:
    """TrainingArguments both sides share: constant lr, AdamW without weight decay, grad-norm 1.0, float32 on the
    CPU, no gradient checkpointing (harness.trl_args), no checkpoints, no logging to trackers."""
    return {"output_dir": str(out / "trl"), "learning_rate": lr, "lr_scheduler_type": "constant", "warmup_steps": 0,
            "weight_decay": 0.0, "max_grad_norm": 1.0, "max_steps": steps, "use_cpu": True, "report_to": "none",
            "logging_steps": 10, "save_strategy": "no", "disable_tqdm": True, "dataloader_num_workers": 0,
            "seed": cell["seed"], "gradient_checkpointing": False, "bf16": False}  # fmt: skip


def run_trl(cell: dict[str, Any], start: Path, out: Path) -> Path:
    from datasets import Dataset

    from posttrain.policies import load_tokenizer

    trainer_name, settings = METHODS[cell["method"]]["trl"]
    settings = dict(settings)
    tokenizer = load_tokenizer(start)
    dataset = Dataset.from_list(training_rows(cell))
    reward = verifier_reward(cell["task"])
    if trainer_name in ("grpo", "rloo"):
        from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

        rewards = [reward]
        if settings.pop("overlong", False):
            from trl.rewards import get_soft_overlong_punishment

            rewards.append(get_soft_overlong_punishment(max_completion_len=MAX_NEW_TOKENS, soft_punish_cache=2))
        config, trainer = (GRPOConfig, GRPOTrainer) if trainer_name == "grpo" else (RLOOConfig, RLOOTrainer)
        args = config(**trl_common(cell, out, lr=RL_BUDGET["lr"], steps=RL_BUDGET["max_steps"]),
                      per_device_train_batch_size=RL_BUDGET["prompts_per_step"] * RL_BUDGET["group_size"],
                      num_generations=RL_BUDGET["group_size"], max_completion_length=MAX_NEW_TOKENS,
                      temperature=RL_BUDGET["temperature"], top_p=1.0, top_k=0, **settings)  # fmt: skip
        run = trainer(model=str(start), reward_funcs=rewards, args=args, train_dataset=dataset,
                      processing_class=tokenizer)  # fmt: skip
    elif trainer_name == "online_dpo":
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

        budget = ONLINE_BUDGET
        args = OnlineDPOConfig(**trl_common(cell, out, lr=budget["lr"], steps=budget["max_steps"]),
                               per_device_train_batch_size=budget["prompts"], max_new_tokens=MAX_NEW_TOKENS,
                               max_length=MAX_LENGTH, temperature=RL_BUDGET["temperature"], **settings)  # fmt: skip
        run = OnlineDPOTrainer(model=str(start), reward_funcs=[reward], args=args, train_dataset=dataset,
                               processing_class=tokenizer)  # fmt: skip
    else:
        common = trl_common(cell, out, lr=PREF_BUDGET["lr"], steps=PREF_BUDGET["max_steps"])
        batch = {"per_device_train_batch_size": PREF_BUDGET["batch_size"], "max_length": MAX_LENGTH}
        if trainer_name == "dpo":
            from trl import DPOConfig as config
            from trl import DPOTrainer as trainer
        elif trainer_name == "kto":
            from trl import KTOConfig as config
            from trl import KTOTrainer as trainer
        else:
            from trl.experimental.cpo import CPOConfig as config
            from trl.experimental.cpo import CPOTrainer as trainer
        run = trainer(model=str(start), args=config(**common, **batch, **settings), train_dataset=dataset,
                      processing_class=tokenizer)  # fmt: skip
    run.train()
    final = out / "final"
    run.save_model(str(final))
    tokenizer.save_pretrained(final)
    shutil.rmtree(out / "trl", ignore_errors=True)
    return final


def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    if cell["job"] == "sft":
        return run_sft(cell)
    start, out = start_dir(cell["task"], cell["seed"], cell["setting"]), run_dir(cell)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.perf_counter()
    final = (run_posttrain if cell["side"] == "posttrain" else run_trl)(cell, start, out)
    seconds = time.perf_counter() - started
    accuracy = held_out_accuracy(final, cell["task"], cell["seed"])
    shutil.rmtree(final, ignore_errors=True)  # the figures are kept; the models are not needed again
    return {"accuracy": accuracy, "seconds": seconds}


def worker(payload: str) -> None:
    import torch

    torch.set_num_threads(1)
    print(harness.RESULT_PREFIX + json.dumps(run_cell(json.loads(payload))), flush=True)


# --- parent: the grid, the JSON, the table --------------------------------------------------------------------


def load_results() -> dict[str, Any]:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": {}, "commands": []}


def run_grid(grid: list[dict[str, Any]], results: dict[str, Any], *, timeout_s: float) -> None:
    todo = [c for c in grid if key_of(c) not in results["runs"]]
    print(f"{len(grid)} runs in the grid, {len(grid) - len(todo)} already in {RESULTS.name}, {len(todo)} to run",
          flush=True)  # fmt: skip
    for i, cell in enumerate(todo, 1):
        if cell["job"] != "sft" and key_of({**cell, "job": "sft"}) not in results["runs"]:
            print(f"[{i}/{len(todo)}] {key_of(cell)}: skipped, its SFT run failed", flush=True)
            continue
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cell)], env=harness.worker_env(1),
                              capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)  # fmt: skip
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(harness.RESULT_PREFIX)]
        if proc.returncode != 0 or not lines:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            print(f"[{i}/{len(todo)}] {key_of(cell)}: FAILED (exit {proc.returncode})\n{tail}", flush=True)
            results.setdefault("failed", {})[key_of(cell)] = tail[-2000:]
            RESULTS.write_text(json.dumps(results, indent=1))
            continue
        report = {**cell, **json.loads(lines[-1][len(harness.RESULT_PREFIX) :]),
                  "wall_s": time.perf_counter() - started}  # fmt: skip
        results["runs"][key_of(cell)] = report
        results.get("failed", {}).pop(key_of(cell), None)
        RESULTS.write_text(json.dumps(results, indent=1))
        shown = {k: round(v, 3) for k, v in report.items() if k.startswith(("accuracy", "seconds"))}
        print(f"[{i}/{len(todo)}] {key_of(cell)}: {shown}", flush=True)


def start_accuracy(results: dict[str, Any], task: str, setting: str, seed: int) -> float | None:
    sft = results["runs"].get(f"{task}/sft/s{seed}")
    return None if sft is None else sft[f"accuracy_{setting}"]


def table(results: dict[str, Any]) -> str:
    """Markdown: per task, start and method, the SFT start and each side's held-out accuracy after (mean over seeds),
    its change in points (mean ± standard deviation over seeds: each seed's), the difference of the mean changes,
    and the mean seconds of a run's training."""
    groups: dict[tuple, dict[str, list[dict[str, Any]]]] = {}
    for run in results["runs"].values():
        if run["job"] == "train":
            group = (run["task"], run["setting"], run["method"], run["pairs"])
            groups.setdefault(group, {}).setdefault(run["side"], []).append(run)
    order = {m: i for i, m in enumerate(METHODS)}
    lines = ["| task | start | method | pairs | SFT start | posttrain after (change per seed) | TRL after (change per "
             "seed) | posttrain - TRL | AdaStop, 0.05 | s per run (posttrain / TRL) |", "|---" * 10 + "|"]  # fmt: skip
    for group in sorted(groups, key=lambda g: (g[0], g[1], order[g[2]], g[3])):
        task, setting, method, pairs = group
        sides = groups[group]
        seeds = sorted({r["seed"] for runs in sides.values() for r in runs})
        starts = [start_accuracy(results, task, setting, s) for s in seeds]
        cells, means = [], {}
        for side in ("posttrain", "trl"):
            runs = sorted(sides.get(side, []), key=lambda r: r["seed"])
            if not runs:
                cells.append("-")
                continue
            changes = [100 * (r["accuracy"] - start_accuracy(results, task, setting, r["seed"])) for r in runs]
            means[side] = statistics.mean(changes)
            spread = f" ± {statistics.stdev(changes):.1f}" if len(changes) > 1 else ""
            per_seed = ", ".join(f"{c:+.1f}" for c in changes)
            cells.append(f"{statistics.mean(r['accuracy'] for r in runs):.1%} ({means[side]:+.1f}{spread}: {per_seed})")
        gap = f"{means['posttrain'] - means['trl']:+.1f}" if len(means) == 2 else "-"
        seconds = " / ".join(f"{statistics.mean(r['seconds'] for r in sides[s]):.0f}" if s in sides else "-"
                             for s in ("posttrain", "trl"))  # fmt: skip
        start = f"{statistics.mean(s for s in starts if s is not None):.1%}"
        lines.append(f"| {task} | {setting} | {method} | {pairs} | {start} | {cells[0]} | {cells[1]} | {gap} | "
                     f"{verdicts(results, task, setting, sides)} | {seconds} |")  # fmt: skip
    return "\n".join(lines)


def verdict(values_a: list[float], values_b: list[float], a: str, b: str) -> str:
    """AdaStop (`posttrain compare`'s test) on per-seed values, one interim of all of them, in words."""
    from posttrain.report.compare import CompareError, compare_values

    if len(values_a) != len(values_b) or len(values_a) < 2:
        return "-"
    try:
        result = compare_values(values_a, values_b, metric="accuracy", n=len(values_a), K=1, alpha=0.05)
    except CompareError as error:
        return str(error)
    return {"A": f"{a} higher", "B": f"{b} higher", "equal": "no difference found"}.get(result.decision, "undecided")


def verdicts(results: dict[str, Any], task: str, setting: str, sides: dict[str, list[dict[str, Any]]]) -> str:
    """AdaStop per side, after against the SFT start over the same seeds, then posttrain against TRL."""
    out = []
    for side in ("posttrain", "trl"):
        runs = sorted(sides.get(side, []), key=lambda r: r["seed"])
        if runs:
            starts = [start_accuracy(results, task, setting, r["seed"]) for r in runs]
            out.append(f"{side}: " + verdict([r["accuracy"] for r in runs], starts, "after", "start"))
    both = sorted({r["seed"] for r in sides.get("posttrain", [])} & {r["seed"] for r in sides.get("trl", [])})
    if both:
        by_seed = {side: {r["seed"]: r["accuracy"] for r in sides[side]} for side in ("posttrain", "trl")}
        out.append("vs TRL: " + verdict([by_seed["posttrain"][s] for s in both], [by_seed["trl"][s] for s in both],
                                        "posttrain", "TRL"))  # fmt: skip
    return "; ".join(out)


def estimate(results: dict[str, Any], grid: list[dict[str, Any]]) -> str:
    """The grid's remaining time from the measured mean wall time of each kind of run (SFT, and per method and
    side), or None for kinds never measured."""
    measured: dict[tuple, list[float]] = {}
    for run in results["runs"].values():
        kind = ("sft",) if run["job"] == "sft" else (run["method"], run["side"])
        measured.setdefault(kind, []).append(run["wall_s"])
    todo = [c for c in grid if key_of(c) not in results["runs"]]
    total, unknown = 0.0, set()
    for cell in todo:
        kind = ("sft",) if cell["job"] == "sft" else (cell["method"], cell["side"])
        if kind in measured:
            total += statistics.mean(measured[kind])
        else:
            unknown.add(kind)
    note = f"; never measured: {sorted(unknown)}" if unknown else ""
    return f"{len(todo)} runs to go, about {total / 3600:.1f} h at the measured wall times{note}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"the quick grid: {QUICK}")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--settings", nargs="+", default=["low", "high"], choices=("low", "high"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--pairs", nargs="+", default=list(PAIR_KINDS), choices=PAIR_KINDS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    trl = importlib.util.find_spec("trl") is not None
    parser.add_argument("--sides", nargs="+", default=["posttrain", "trl"] if trl else ["posttrain"],
                        choices=("posttrain", "trl"), help="default: both where trl is installed, else posttrain")
    parser.add_argument("--timeout-s", type=float, default=3600, help="most seconds one run may take")
    parser.add_argument("--table", action="store_true", help="print the table of the results so far and stop")
    parser.add_argument("--estimate", action="store_true", help="print the grid's remaining time and stop")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args.worker)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.quick:
        args.tasks, args.settings, args.methods, args.pairs = (QUICK[k] for k in ("tasks", "settings", "methods",
                                                                                  "pairs"))  # fmt: skip
    results = load_results()
    grid = cells(args.tasks, args.settings, args.methods, args.pairs, args.seeds, args.sides)
    if args.table:
        return print(table(results))
    print(estimate(results, grid), flush=True)
    if args.estimate:
        return None
    results["commands"].append({"command": harness.command_line(), "machine": harness.machine()})
    run_grid(grid, results, timeout_s=args.timeout_s)
    print(table(results))


if __name__ == "__main__":
    main()
