"""Everything an online RL run builds once, before its first step (STYLE.md §5: the loop builds nothing).

`build_rl_run` assembles the policy, the reference (only when a KL term needs one), the critic (only
when the advantage declares the `critic` need), the rewards, the encoded prompts, the optimiser and,
when resuming, the state of the newest checkpoint; `save_rl_checkpoint` writes that state back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.config.rl import RLConfig
from posttrain.data.encoding import PromptTokens, check_positions
from posttrain.data.errors import DataError
from posttrain.data.report import LoadReport
from posttrain.objectives import ADVANTAGES
from posttrain.rewards import LoadedReward, RewardSet, RewardSpec, load_reward_fn
from posttrain.rollout import SamplingParams
from posttrain.runtime.checkpoint import Checkpointer
from posttrain.runtime.optim import build_adamw
from posttrain.trainers.build import EpochSampler, Rows, build_optimisation, load_prompts, policy_and_reference
from posttrain.trainers.evaluation import EvalResult, evaluate_with
from posttrain.trainers.rl_update import MovingBaseline, ValueModel
from posttrain.trainers.run_state import restore_checkpoint, save_checkpoint


@dataclass
class RLRun:
    """The built parts of one run, and the state a checkpoint carries (the last six fields)."""

    model: Any
    tokenizer: Any
    reference: Any | None
    critic: ValueModel | None
    critic_optimizer: Any | None
    reward_set: RewardSet
    train: list[PromptTokens]
    eval_prompts: list[PromptTokens]
    eval_reward: Any
    """The verifier of held-out evaluation (`eval.reward`), loaded once."""
    report: LoadReport
    checkpointer: Checkpointer
    checkpoint: Path | None
    optim: Any
    sampler: EpochSampler
    generator: torch.Generator
    baseline: MovingBaseline
    kl_coef: float
    history: list[dict[str, float]]
    start_step: int


def build_rl_run(
    cfg: RLConfig,
    *,
    model: Any,
    tokenizer: Any,
    train_rows: Rows | None,
    eval_rows: Rows | None,
    rewards: list[Any] | None,
    checkpointer: Checkpointer,
    checkpoint: Path | None,
    generator: torch.Generator,
    device: torch.device,
) -> RLRun:
    rl = cfg.rl
    model, tokenizer, reference = policy_and_reference(  # a reference only when a KL term needs it
        cfg.model, model, tokenizer, checkpoint,
        needs_reference=rl.kl.coef > 0, seed=cfg.seed, device=device, recipe_dir=cfg.recipe_dir,
    )  # fmt: skip
    prompt_key = "rl.max_prompt_length" if rl.max_prompt_length else "data.max_length"
    new_tokens = {"rl.sampling.max_new_tokens": rl.sampling.max_new_tokens}
    check_positions(model, {prompt_key: rl.max_prompt_length or cfg.data.max_length, **new_tokens})
    critic = ValueModel(model).to(device) if "critic" in ADVANTAGES[rl.advantage].needs else None
    critic_optimizer = None
    if critic is not None:
        lr = rl.value.lr or cfg.train.lr
        critic_optimizer = build_adamw(critic.parameters(), lr=lr, weight_decay=0.0, betas=cfg.train.adam_betas)
    where = {"seed": cfg.seed, "recipe_dir": cfg.recipe_dir, "max_length": cfg.rl.max_prompt_length}
    reward_set = build_reward_set(cfg, rewards)
    train, report = load_prompts(cfg.data, tokenizer, "train", rows=train_rows, **where)
    train = scorable_prompts(train, reward_set.required_columns(), on_bad_row=cfg.data.on_bad_row, report=report)
    eval_split, _ = load_prompts(cfg.data, tokenizer, "eval", rows=eval_rows, limit=cfg.eval.limit, **where)
    eval_prompts = [p for p in eval_split if "answer" in p.extra]
    sampler = EpochSampler(len(train), seed=cfg.seed, report=report)
    optim = build_optimisation(model, cfg.train)
    run = RLRun(
        model=model, tokenizer=tokenizer, reference=reference, critic=critic, critic_optimizer=critic_optimizer,
        reward_set=reward_set, train=train, eval_prompts=eval_prompts,
        eval_reward=load_reward_fn(cfg.eval.reward, base_dir=cfg.recipe_dir), report=report,
        checkpointer=checkpointer, checkpoint=checkpoint, optim=optim, sampler=sampler, generator=generator,
        baseline=MovingBaseline(), kl_coef=rl.kl.coef, history=[], start_step=0,
    )  # fmt: skip
    if checkpoint is not None:
        _restore_rl_state(run)
    return run


def _restore_rl_state(run: RLRun) -> None:
    def restore_rl_extra(state: dict[str, Any]) -> None:
        if run.critic is not None:
            run.critic.load_state_dict(state["critic"])
            run.critic_optimizer.load_state_dict(state["critic_optimizer"])
        run.baseline = MovingBaseline(**state["baseline"])
        run.kl_coef = state["kl_coef"]

    run.history, run.start_step = restore_checkpoint(
        run.checkpointer, run.checkpoint, run.optim, run.sampler, run.generator, restore_rl_extra
    )


def save_rl_checkpoint(run: RLRun, step: int) -> Path:
    extra: dict[str, Any] = {"baseline": {"value": run.baseline.value, "steps": run.baseline.steps},
                             "kl_coef": run.kl_coef}  # fmt: skip
    if run.critic is not None:
        extra |= {"critic": run.critic.state_dict(), "critic_optimizer": run.critic_optimizer.state_dict()}
    return save_checkpoint(run.checkpointer, step, run.model, run.tokenizer, run.optim, run.sampler, run.generator,
                           run.history, extra)  # fmt: skip


def scorable_prompts(
    prompts: list[PromptTokens], required: dict[str, list[str]], *, on_bad_row: str, report: LoadReport | None
) -> list[PromptTokens]:
    """The prompts whose rows hold every column a reward reads (`RewardSet.required_columns`). A row without one
    would be scored as not applicable by that reward, 0 in the total, and pushed down by its advantage: it raises
    DataError naming the row, the column and the rewards, or with data.on_bad_row: skip is left out and counted
    ("missing reward column"). A column present with the value None stays: not applicable by design (a verifier
    for rows that have no gold answer, beside another reward that scores them)."""
    kept = []
    for prompt in prompts:
        missing = [column for column in required if column not in prompt.extra]
        if not missing:
            kept.append(prompt)
            continue
        if on_bad_row != "skip":
            readers = ", ".join(required[missing[0]])
            raise DataError(
                f"{prompt.where}: no field {missing[0]!r}, which the reward {readers} reads; add it to every row, "
                "or set data.on_bad_row: skip to leave such rows out",
                reason="missing reward column",
            )
        if report is not None:
            report.skipped["missing reward column"] += 1
    if prompts and not kept:
        raise DataError(f"no training prompt holds the columns the rewards read ({', '.join(required)})",
                        reason="missing reward column")  # fmt: skip
    return kept


def build_reward_set(cfg: RLConfig, rewards: list[Any] | None) -> RewardSet:
    """The config's rewards, or `rewards` (TRL-style callables or RewardSpecs) in their place."""
    if rewards is None:
        specs = [RewardSpec(**entry.model_dump()) for entry in cfg.rewards]
        return RewardSet.from_specs(specs, cfg.recipe_dir, max_failure_fraction=cfg.max_failure_fraction)
    loaded = []
    for i, r in enumerate(rewards):
        if callable(r):
            loaded.append(LoadedReward(getattr(r, "__name__", f"reward_{i}"), r, timeout_s=None))
        else:
            loaded += RewardSet.from_specs([r], cfg.recipe_dir).rewards
    return RewardSet(loaded, max_failure_fraction=cfg.max_failure_fraction)


def sampling_params(cfg: RLConfig, eos_token_id: int) -> tuple[SamplingParams, SamplingParams]:
    """(the training sampler's parameters, greedy decoding with the same length and stop token)."""
    s = cfg.rl.sampling
    params = SamplingParams(
        max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
        min_p=s.min_p, stop_token_ids=(eos_token_id,), stop_strings=tuple(s.stop_strings),
    )  # fmt: skip
    return params, SamplingParams(max_new_tokens=s.max_new_tokens, temperature=0.0, stop_token_ids=(eos_token_id,))


def evaluate_policy(cfg: RLConfig, run: RLRun) -> EvalResult:
    """Held-out greedy accuracy (and pass@k), with its own generator so that it never shifts training's."""
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    return evaluate_with(run.model, run.tokenizer, run.eval_prompts, run.eval_reward, cfg.eval, generator=generator)
