"""Online RL (`posttrain rl`): the PPO / GRPO family in one loop.

A step samples `rl.group_size` (G) completions for each of `rl.prompts_per_step` (P) prompts, scores
them, turns the scores into advantages over the whole step (supplying what the estimator declares in
`needs`), then runs `rl.epochs` passes of `rl.minibatches` optimiser updates. Every objective is a
registered function named in the config; the loop never compares a name to a string.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posttrain.config.rl import RLConfig
from posttrain.data import encode_prompts
from posttrain.objectives import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES
from posttrain.objectives.kl import adaptive_kl_coef
from posttrain.objectives.value import lambda_returns
from posttrain.policies import load_model, save_pretrained, token_logprobs
from posttrain.rewards import RewardSet, RewardSpec, load_reward_fn
from posttrain.rollout import ENGINES, SamplingParams
from posttrain.runtime.checkpoint import Checkpointer, model_dir
from posttrain.runtime.device import limit_cpu_threads, resolve_device
from posttrain.runtime.logging import RunLogger
from posttrain.runtime.optim import build_adamw
from posttrain.runtime.seeding import capture_rng_states, restore_rng_states, seed_everything
from posttrain.trainers.build import EpochSampler, Rows, build_optimisation, build_policy, load_split
from posttrain.trainers.evaluation import EvalResult, evaluate
from posttrain.trainers.rl_parts import (
    MovingBaseline,
    StepTensors,
    UpdateStats,
    ValueModel,
    batched_forward,
    call_with,
    frozen_copy,
    keep_informative_groups,
    outcome_at_last_token,
    per_token,
    reward_metrics,
    sample_and_score,
    score_rollouts,
    update_minibatch,
)
from posttrain.trainers.run_state import rewrite_metrics


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
    limit_cpu_threads()
    generator = seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    run_dir, rl = Path(cfg.output_dir), cfg.rl
    checkpointer = Checkpointer(run_dir, keep_last=cfg.train.keep_last)
    checkpoint = checkpointer.latest() if resume else None
    if model is None or tokenizer is None:
        model, tokenizer = build_policy(cfg.model, seed=cfg.seed, device=device, recipe_dir=cfg.recipe_dir)
    advantage, policy_loss = ADVANTAGES[rl.advantage], POLICY_LOSSES[rl.policy_loss]
    aggregation, kl_estimator = AGGREGATIONS[rl.loss_aggregation], KL_ESTIMATORS[rl.kl.estimator]
    needs = set(advantage.needs)
    reference = frozen_copy(model) if rl.kl.coef > 0 else None  # only when a KL term needs it
    critic = ValueModel(model).to(device) if "critic" in needs else None
    critic_optimizer = (
        build_adamw(critic.parameters(), lr=rl.value.lr or cfg.train.lr, weight_decay=0.0, betas=cfg.train.adam_betas)
        if critic
        else None
    )
    reward_set = _reward_set(cfg, rewards)
    train, report = _encode_prompts(cfg, tokenizer, train_rows, "train")
    eval_prompts = [p for p in _encode_prompts(cfg, tokenizer, eval_rows, "eval")[0] if "answer" in p.extra]
    sampler = EpochSampler(len(train), seed=cfg.seed)
    optim = build_optimisation(model, cfg.train)
    baseline, kl_coef, history, start_step = MovingBaseline(), rl.kl.coef, [], 0
    if checkpoint is not None:
        model.load_state_dict(load_model(model_dir(checkpoint), device=device).state_dict())
        state = checkpointer.load_state(checkpoint)
        optim.optimizer.load_state_dict(state["optimizer"])
        optim.scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["data"])
        restore_rng_states(state["rng"], {"sampling": generator})
        if critic is not None:
            critic.load_state_dict(state["critic"])
            critic_optimizer.load_state_dict(state["critic_optimizer"])
        baseline = MovingBaseline(**state["baseline"])
        kl_coef, history, start_step = state["kl_coef"], state["history"], state["step"]
        rewrite_metrics(run_dir, history)
    log = RunLogger(
        run_dir,
        total_steps=cfg.train.max_steps,
        start_step=start_step,
        headline=("rewards/total/mean", "accuracy", "kl"),
        progress=progress,
    )
    log.print(f"data: {report.summary()}")
    if checkpoint is not None:
        log.print(f"resumed from {checkpoint} at step {start_step}")
    eos = (tokenizer.eos_token_id,)
    s = rl.sampling
    params = SamplingParams(
        max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
        min_p=s.min_p, stop_token_ids=eos, stop_strings=tuple(s.stop_strings),
    )  # fmt: skip
    greedy = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=0.0, stop_token_ids=eos)
    engine, pad_id = ENGINES[rl.engine], tokenizer.pad_token_id

    def draw() -> Any:
        prompts = [train[i] for i in sampler.take(rl.prompts_per_step)]
        return sample_and_score(
            engine, model, tokenizer, reward_set, prompts, params, group_size=rl.group_size, generator=generator
        )

    model.train()
    for step in range(start_step, cfg.train.max_steps):
        started = time.perf_counter()
        scored = (
            keep_informative_groups(draw, num_groups=rl.prompts_per_step, max_batches=rl.dynamic_sampling_max_batches)
            if rl.dynamic_sampling
            else draw()
        )
        rollouts, rewards_PG = scored.rollouts, scored.rewards.total.to(device)  # [P*G]
        padded = rollouts.to_padded(pad_id, device)
        mask_B_T, num_seqs = padded.loss_mask_B_T, rollouts.num_completions
        num_tokens = int(mask_B_T.sum())

        def forward_of(net: Any, fn: Any, padded: Any = padded, mask_B_T: torch.Tensor = mask_B_T) -> torch.Tensor:
            def forward_rows(sel: Any) -> torch.Tensor:
                return fn(net, padded.input_ids_B_T[sel], padded.attention_mask_B_T[sel], mask_B_T[sel])

            return batched_forward(forward_rows, len(mask_B_T), rl.micro_batch_size)

        step_tensors = StepTensors(padded, adv_B_T=torch.empty(0))
        token_rewards_B_T = outcome_at_last_token(rewards_PG, mask_B_T)
        kl_B_T = torch.zeros_like(token_rewards_B_T)
        if reference is not None:
            step_tensors.ref_logp_B_T = forward_of(reference, lambda m, i, a, t: token_logprobs(
                m, i, a, t, temperature=s.temperature)[0])  # fmt: skip
            kl_B_T = torch.where(mask_B_T, kl_estimator(padded.old_logp_B_T, step_tensors.ref_logp_B_T), 0.0)
            if rl.kl.in_reward:
                token_rewards_B_T = token_rewards_B_T - kl_coef * kl_B_T
        available: dict[str, Any] = {
            "rewards_PG": rewards_PG, "mask_B_T": mask_B_T, "group_size": rollouts.group_size,
            "token_rewards_B_T": token_rewards_B_T,
        }  # fmt: skip
        if "critic" in needs:
            values = forward_of(critic, lambda m, i, a, t: m(i, a))
            step_tensors.old_values_B_T = available["values_B_T"] = torch.where(mask_B_T, values, 0.0)
            step_tensors.returns_B_T = call_with(
                lambda_returns, available | {"values_B_T": step_tensors.old_values_B_T}, rl.advantage_args
            )
        if "greedy_rollout" in needs:
            model.eval()
            greedy_rollouts = engine.generate(model, rollouts.prompt_ids, greedy, n=1, tokenizer=tokenizer)
            model.train()
            available["greedy_rewards_P"] = score_rollouts(
                reward_set, tokenizer, scored.prompts, greedy_rollouts
            ).total.to(device)
        if "moving_baseline" in needs:
            available["baseline"] = torch.tensor(baseline.value, device=device)
        step_tensors.adv_B_T = per_token(call_with(advantage, available, rl.advantage_args), mask_B_T)
        prepared = time.perf_counter()

        stats = UpdateStats()
        for _ in range(rl.epochs):
            order = torch.randperm(num_seqs, generator=generator) if rl.minibatches > 1 else torch.arange(num_seqs)
            for rows in order.chunk(rl.minibatches):
                update_kwargs = dict(
                    policy_loss=policy_loss, policy_loss_args=rl.policy_loss_args, aggregation=aggregation,
                    kl_estimator=kl_estimator if reference is not None and not rl.kl.in_reward else None,
                    kl_coef_in_loss=kl_coef, entropy_coef=rl.entropy_coef, value_coef=rl.value.coef,
                    value_clip_range=rl.value.clip_range, temperature=s.temperature,
                    max_len=s.max_new_tokens, micro_batch_size=rl.micro_batch_size, stats=stats,
                )  # fmt: skip
                update_minibatch(model, critic, step_tensors, rows.to(device), **update_kwargs)
                stats.add("grad_norm", _step(model, optim.optimizer, cfg.train.max_grad_norm))
                if critic is not None:
                    _step(critic, critic_optimizer, cfg.train.max_grad_norm)
        optim.scheduler.step()
        trained = time.perf_counter()

        observed_kl = (kl_B_T.sum() / max(1, num_seqs)).item()  # per sequence, at sampling time
        if rl.kl.target is not None and reference is not None:
            kl_coef = float(
                adaptive_kl_coef(kl_coef, observed_kl, target=rl.kl.target, horizon=rl.kl.horizon, n_steps=num_seqs)
            )
        baseline.update(rewards_PG)
        lengths = [len(c) for c in rollouts.completion_ids]
        gen_tokens = sum(lengths)
        metrics = {
            **reward_metrics(scored.rewards),
            **stats.means(rl.epochs * rl.minibatches, num_tokens * rl.epochs),
            "kl_per_seq": observed_kl,
            "kl_coef": kl_coef,
            "completion_length": gen_tokens / len(lengths),
            "truncated": sum(r == "length" for r in rollouts.finish_reasons) / len(lengths),
            "dropped_groups": float(scored.dropped_groups),
            "lr": optim.scheduler.get_last_lr()[0],
            "gen_s": scored.gen_s,
            "score_s": scored.score_s,
            "train_s": trained - prepared,
            "gen_tokens_per_s": gen_tokens / max(scored.gen_s, 1e-9),
            "train_tokens_per_s": num_tokens * rl.epochs / max(trained - prepared, 1e-9),
            "step_time_s": trained - started,
        }
        done = step + 1
        if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < cfg.train.max_steps and eval_prompts:
            metrics |= _evaluate(cfg, model, tokenizer, eval_prompts).metrics()
        history.append({"step": done, **metrics})
        if done % cfg.train.log_every == 0 or done == cfg.train.max_steps:
            log.log(done, metrics)
        if cfg.train.save_every and done % cfg.train.save_every == 0 and done < cfg.train.max_steps:
            _save(
                checkpointer,
                done,
                model,
                tokenizer,
                optim,
                sampler,
                generator,
                history,
                critic,
                critic_optimizer,
                baseline,
                kl_coef,
            )

    final_eval = None
    if eval_prompts:
        final_eval = _evaluate(cfg, model, tokenizer, eval_prompts)
        log.log(cfg.train.max_steps, {f"eval_{k}": v for k, v in final_eval.metrics().items()}, kind="eval")
        log.print(f"eval: greedy accuracy {final_eval.greedy_accuracy:.4f} on {final_eval.num_prompts} prompts")
    _save(
        checkpointer,
        cfg.train.max_steps,
        model,
        tokenizer,
        optim,
        sampler,
        generator,
        history,
        critic,
        critic_optimizer,
        baseline,
        kl_coef,
    )
    final_dir = save_pretrained(model, tokenizer, run_dir / "final")
    reward_set.close()
    log.close()
    return RLResult(model, tokenizer, final_dir, history, final_eval)


def _step(net: Any, optimizer: Any, max_grad_norm: float | None) -> float:
    params = [p for p in net.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def _reward_set(cfg: RLConfig, rewards: list[Any] | None) -> RewardSet:
    if rewards is None:
        specs = [RewardSpec(**entry.model_dump()) for entry in cfg.rewards]
        return RewardSet.from_specs(specs, cfg.recipe_dir, max_failure_fraction=cfg.max_failure_fraction)
    from posttrain.rewards import LoadedReward

    loaded = []
    for i, r in enumerate(rewards):
        if callable(r):
            loaded.append(LoadedReward(getattr(r, "__name__", f"reward_{i}"), r, timeout_s=None))
        else:
            loaded += RewardSet.from_specs([r], cfg.recipe_dir).rewards
    return RewardSet(loaded, max_failure_fraction=cfg.max_failure_fraction)


def _encode_prompts(cfg: RLConfig, tokenizer: Any, rows: Rows | None, split: str) -> tuple[list[Any], Any]:
    loaded = load_split(cfg.data, "prompt", split, seed=cfg.seed, recipe_dir=cfg.recipe_dir, rows=rows)
    if loaded is None:
        return [], None
    examples, report = loaded
    if split == "eval" and cfg.eval.limit is not None:
        examples = examples[: cfg.eval.limit]
    max_length = cfg.rl.max_prompt_length or cfg.data.max_length
    return encode_prompts(examples, tokenizer, max_length=max_length, report=report), report


def _evaluate(cfg: RLConfig, model: Any, tokenizer: Any, prompts: list[Any]) -> EvalResult:
    """Held-out greedy accuracy (and pass@k), with its own generator so that it never shifts training's."""
    e = cfg.eval
    reward = load_reward_fn(e.reward, base_dir=cfg.recipe_dir)
    return evaluate(
        model, tokenizer, prompts, reward, max_new_tokens=e.max_new_tokens, samples=e.samples, k=e.k,
        temperature=e.temperature, batch_size=e.batch_size, generator=torch.Generator().manual_seed(cfg.seed + 1),
    )  # fmt: skip


def _save(checkpointer: Checkpointer, step: int, model: Any, tokenizer: Any, optim: Any, sampler: EpochSampler,
          generator: torch.Generator, history: list[dict[str, float]], critic: Any, critic_optimizer: Any,
          baseline: MovingBaseline, kl_coef: float) -> None:  # fmt: skip
    state = {
        "optimizer": optim.optimizer.state_dict(),
        "scheduler": optim.scheduler.state_dict(),
        "data": sampler.state_dict(),
        "rng": capture_rng_states({"sampling": generator}),
        "history": history,
        "baseline": {"value": baseline.value, "steps": baseline.steps},
        "kl_coef": kl_coef,
    }
    if critic is not None:
        state |= {"critic": critic.state_dict(), "critic_optimizer": critic_optimizer.state_dict()}
    checkpointer.save(step, save_model=lambda d: save_pretrained(model, tokenizer, d), state=state)
