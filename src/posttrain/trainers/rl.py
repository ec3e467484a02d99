"""Online RL (`posttrain rl`): the PPO / GRPO family in one loop.

A step samples `rl.group_size` (G) completions for each of `rl.prompts_per_step` (P) prompts, scores
them, turns the scores into advantages over the whole step (supplying what the estimator declares in
`needs`), then runs `rl.epochs` passes of `rl.minibatches` optimiser updates. Every objective is a
registered function named in the config; the loop never compares a name to a string. What the run
builds once lives in `rl_run.py`; sampling in `rl_parts.py`; the update in `rl_update.py`.
"""

from __future__ import annotations

import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posttrain.config.rl import RLConfig
from posttrain.objectives import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES
from posttrain.objectives.kl import adaptive_kl_coef
from posttrain.policies import save_pretrained
from posttrain.rewards.inputs import RewardLog, trainer_state, trl_reward_kwargs
from posttrain.rollout import ENGINES
from posttrain.runtime.guards import NonFiniteGuard, step_schedule
from posttrain.runtime.logging import RunLogger
from posttrain.runtime.signals import StopRequest
from posttrain.trainers.build import Rows
from posttrain.trainers.evaluation import EvalResult
from posttrain.trainers.rl_parts import (
    Scored,
    draw_step,
    reward_metrics,
    sample_and_score,
    score_groups,
)
from posttrain.trainers.rl_run import RLRun, build_rl_run, evaluate_policy, sampling_params, save_rl_checkpoint
from posttrain.trainers.rl_update import Objectives, UpdateStats, prepare_step, update_minibatch
from posttrain.trainers.run_state import eval_due, finish_step, print_start, start_run, step_metrics


@dataclass
class RLResult:
    model: Any
    tokenizer: Any
    final_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)
    eval: EvalResult | None = None


def train_rl(
    cfg: RLConfig,
    *,
    model: Any = None,
    tokenizer: Any = None,
    train_rows: Rows | None = None,
    eval_rows: Rows | None = None,
    rewards: list[Any] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> RLResult:
    """Train a policy on its own samples. `rewards`: callables or RewardSpecs replacing `cfg.rewards`."""
    generator, device, checkpointer, checkpoint = start_run(cfg, resume)
    rl = cfg.rl
    run = build_rl_run(
        cfg, model=model, tokenizer=tokenizer, train_rows=train_rows, eval_rows=eval_rows, rewards=rewards,
        checkpointer=checkpointer, checkpoint=checkpoint, generator=generator, device=device,
    )  # fmt: skip
    model, tokenizer, history = run.model, run.tokenizer, run.history
    objectives = Objectives(
        ADVANTAGES[rl.advantage], POLICY_LOSSES[rl.policy_loss], AGGREGATIONS[rl.loss_aggregation],
        KL_ESTIMATORS[rl.kl.estimator],
    )  # fmt: skip
    needs = set(objectives.advantage.needs)
    kl_in_loss = objectives.kl_estimator if run.reference is not None and not rl.kl.in_reward else None
    guard = NonFiniteGuard(cfg.train.max_bad_steps, run.checkpointer, history)
    critic_guard = NonFiniteGuard(cfg.train.max_bad_steps, run.checkpointer)
    log = RunLogger(
        Path(cfg.output_dir), total_steps=cfg.train.max_steps, start_step=run.start_step,
        headline=("rewards/total/mean", "accuracy", "kl_per_seq"), progress=progress,
    )  # fmt: skip
    print_start(log, cfg, run.report, checkpoint=run.checkpoint, start_step=run.start_step, train_rows=train_rows,
                eval_rows=eval_rows)  # fmt: skip
    params, greedy = sampling_params(cfg, tokenizer.eos_token_id)
    engine = ENGINES[rl.engine]

    def draw() -> Scored:
        prompts = [run.train[i] for i in run.sampler.take(rl.prompts_per_step)]
        return sample_and_score(engine, model, tokenizer, run.reward_set, prompts, params, group_size=rl.group_size,
                                generator=generator, reward_kwargs=reward_kwargs)  # fmt: skip

    model.train()
    with StopRequest() as stop, closing(run.reward_set):
        for step in range(run.start_step, cfg.train.max_steps):
            started = time.perf_counter()
            reward_log = RewardLog()
            reward_kwargs = trl_reward_kwargs(trainer_state(step, cfg.train.max_steps), reward_log)
            scored = draw_step(draw, rl.prompts_per_step, rl.dynamic_sampling_max_batches if rl.dynamic_sampling else 0)
            padded = scored.rollouts.to_padded(tokenizer.pad_token_id, device)
            rewards_PG = scored.rewards.total.to(device)  # [P*G]
            available: dict[str, Any] = {"rewards_PG": rewards_PG, "group_size": scored.rollouts.group_size}
            if "greedy_rollout" in needs:
                available["greedy_rewards_P"] = _greedy_rewards(run, engine, scored, greedy, device, reward_kwargs)
            if "moving_baseline" in needs:
                available["baseline"] = torch.tensor(run.baseline.value, device=device)
            tensors, kl_B_T = prepare_step(
                padded, available, objectives, advantage_args=rl.advantage_args, reference=run.reference,
                critic=run.critic, kl_coef=run.kl_coef, kl_in_reward=rl.kl.in_reward,
                temperature=params.temperature, micro_batch_size=rl.micro_batch_size,
            )  # fmt: skip
            prepared = time.perf_counter()

            stats, num_seqs = UpdateStats(), scored.rollouts.num_completions
            for _ in range(rl.epochs):
                order = torch.randperm(num_seqs, generator=generator) if rl.minibatches > 1 else torch.arange(num_seqs)
                for rows in order.chunk(rl.minibatches):
                    update_minibatch(
                        model, run.critic, tensors, rows.to(device), policy_loss=objectives.policy_loss,
                        policy_loss_args=rl.policy_loss_args, aggregation=objectives.aggregation,
                        kl_estimator=kl_in_loss,
                        kl_coef_in_loss=run.kl_coef, entropy_coef=rl.entropy_coef, value_coef=rl.value.coef,
                        value_clip_range=rl.value.clip_range, temperature=params.temperature,
                        max_len=params.max_new_tokens, micro_batch_size=rl.micro_batch_size, stats=stats,
                    )  # fmt: skip
                    norm = guard.step(model.parameters(), run.optim.optimizer, cfg.train.max_grad_norm, step=step + 1)
                    stats.add("grad_norm", norm)
                    if run.critic is not None:
                        critic_guard.step(
                            run.critic.parameters(), run.critic_optimizer, cfg.train.max_grad_norm, step=step + 1
                        )
            step_schedule(run.optim.scheduler)
            trained = time.perf_counter()

            observed_kl = (kl_B_T.sum() / max(1, num_seqs)).item()  # per sequence, at sampling time
            if rl.kl.target is not None and run.reference is not None:
                run.kl_coef = float(
                    adaptive_kl_coef(
                        run.kl_coef, observed_kl, target=rl.kl.target, horizon=rl.kl.horizon, n_steps=num_seqs
                    )
                )
            run.baseline.update(tensors.rewards_PG)
            num_tokens = int(padded.loss_mask_B_T.sum())
            metrics = {
                **reward_metrics(scored.rewards, verifier=cfg.eval.reward),
                **stats.means(rl.epochs * rl.minibatches, num_tokens * rl.epochs),
                **_step_metrics(scored, observed_kl, run.kl_coef, num_tokens * rl.epochs, trained - prepared),
                **step_metrics(run.optim, guard, trained - started),
                **({"rewards/kl_shaped/mean": tensors.rewards_PG.mean().item()} if rl.kl.in_reward else {}),
                **reward_log.means(),
            }
            done = step + 1
            if eval_due(cfg.train, done) and run.eval_prompts:
                evaluated = evaluate_policy(cfg, run).metrics()
                metrics |= {f"eval_{k}": v for k, v in evaluated.items()}
            finish_step(done, metrics, history, log, cfg.train, stop, lambda d: save_rl_checkpoint(run, d))

    final_eval = None
    if run.eval_prompts:
        final_eval = evaluate_policy(cfg, run)
        log.log(cfg.train.max_steps, {f"eval_{k}": v for k, v in final_eval.metrics().items()}, kind="eval")
        log.print(f"eval: greedy accuracy {final_eval.greedy_accuracy:.4f} on {final_eval.num_prompts} prompts")
    save_rl_checkpoint(run, cfg.train.max_steps)
    final_dir = save_pretrained(model, tokenizer, Path(cfg.output_dir) / "final")
    log.close()
    return RLResult(model, tokenizer, final_dir, history, final_eval)


def _greedy_rewards(
    run: RLRun, engine: Any, scored: Scored, greedy: Any, device: torch.device, reward_kwargs: dict[str, Any]
) -> torch.Tensor:
    """ReMax's baseline: the reward of each prompt's greedy completion ([P])."""
    run.model.eval()
    rollouts = engine.generate(run.model, scored.rollouts.prompt_ids, greedy, n=1, tokenizer=run.tokenizer)
    run.model.train()
    scores = score_groups(run.reward_set, run.tokenizer, scored.prompts, rollouts.completion_ids, 1, reward_kwargs)
    return scores.total.to(device)


def _step_metrics(scored: Scored, kl: float, kl_coef: float, trained_tokens: int, train_s: float) -> dict[str, float]:
    rollouts = scored.rollouts
    lengths = [len(c) for c in rollouts.completion_ids]
    return {
        "kl_per_seq": kl,
        "kl_coef": kl_coef,
        "completion_length": sum(lengths) / len(lengths),
        "truncated": sum(r == "length" for r in rollouts.finish_reasons) / len(lengths),
        "dropped_groups": float(scored.dropped_groups),
        "gen_s": scored.gen_s,
        "score_s": scored.score_s,
        "train_s": train_s,
        "gen_tokens_per_s": sum(lengths) / max(scored.gen_s, 1e-9),
        "train_tokens_per_s": trained_tokens / max(train_s, 1e-9),
    }
