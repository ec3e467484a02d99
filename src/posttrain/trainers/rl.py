"""Online RL (`posttrain rl`): the PPO / GRPO family in one loop.

A step samples `rl.group_size` (G) episodes for each of `rl.prompts_per_step` (P) prompts through their
environment (`envs.sample_and_score`; single-turn by default), scores them, turns the scores into advantages over
the whole step (supplying the inputs the estimator's signature names: `objectives.registry`), then runs
`rl.epochs` passes of `rl.minibatches` optimiser updates. Every objective is a registered function named in the
config; the loop never compares a name to a string. The run's start, resume, guard, logging and saving are the
one lifecycle every trainer shares (`lifecycle.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from posttrain.config import ConfigError
from posttrain.config.rl import RLConfig
from posttrain.data import EpochSampler
from posttrain.data.encoding import PromptTokens, check_positions
from posttrain.data.report import LoadReport
from posttrain.envs import EnvironmentMix, EpisodeLimits, build_environments, sample_and_score, sample_episodes
from posttrain.envs.sampling import score_episodes
from posttrain.objectives import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES
from posttrain.objectives.advantages import group_reward_inputs, outcome_at_last_token, per_token
from posttrain.objectives.composition import critic_objective, policy_objective
from posttrain.objectives.kl import adaptive_kl_coef
from posttrain.objectives.registry import call_with
from posttrain.objectives.value import clipped_value_loss, lambda_returns
from posttrain.policies import Reference, ValueModel, token_logprobs
from posttrain.rewards import RewardResult, RewardSet, load_reward_fn
from posttrain.rewards.inputs import RewardLog, sample_table, trainer_state, trl_reward_kwargs
from posttrain.rewards.metrics import reward_metrics
from posttrain.rollout import ENGINES
from posttrain.rollout.engine import PaddedRollouts, Rollouts, SampleLayout
from posttrain.rollout.groups import Scored, draw_step, filtered_rows
from posttrain.runtime.distributed import (
    ONE_PROCESS,
    Ranks,
    all_gather_objects,
    all_reduce_sum,
    gather_rows,
    sum_gradients,
)
from posttrain.runtime.logging import phase
from posttrain.runtime.optim import build_adamw
from posttrain.trainers.build import build_optimisation, build_reward_set, policy_and_reference, sampling_params
from posttrain.trainers.evaluation import EvalResult, evaluate_with
from posttrain.trainers.lifecycle import Lifecycle, RunResult, sampling_generator
from posttrain.trainers.splits import Rows, load_prompts, scorable_prompts

BASELINE_DECAY = 0.9
"""EMA decay of the moving reward baseline (b <- 0.9 b + 0.1 mean r): about ten steps of memory."""


@dataclass
class RLRun:
    """The parts of one run, built once before its first step (STYLE.md §5: the loop builds nothing)."""

    model: Any
    tokenizer: Any
    reference: Reference | None
    critic: ValueModel | None
    critic_optimizer: Any | None
    reward_set: RewardSet
    train: list[PromptTokens]
    eval_prompts: list[PromptTokens]
    eval_reward: Any
    report: LoadReport
    optim: Any
    sampler: EpochSampler
    baseline: MovingBaseline
    kl_coef: float
    environments: EnvironmentMix
    limits: EpisodeLimits


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
) -> RunResult:
    """Train a policy on its own samples. `rewards`: callables or RewardSpecs replacing `cfg.rewards`."""
    life = Lifecycle(cfg, kind="rl", resume=resume)
    if life.complete:
        return life.finished_result()
    rl = cfg.rl
    run = build_rl_run(cfg, life, model=model, tokenizer=tokenizer, train_rows=train_rows, eval_rows=eval_rows,
                       rewards=rewards, progress=progress)  # fmt: skip
    model, tokenizer, cfg = run.model, run.tokenizer, life.cfg  # life.cfg: train.epochs resolved to max_steps
    if rl.filtration is not None and life.ranks.distributed:
        raise ConfigError("rl.filtration resamples a whole step's completions and is not data-parallel yet; "
                          "run it in one process")
    objectives = Objectives(ADVANTAGES[rl.advantage], POLICY_LOSSES[rl.policy_loss], AGGREGATIONS[rl.loss_aggregation],
                            KL_ESTIMATORS[rl.kl.estimator])  # fmt: skip
    kl_in_loss = objectives.kl_estimator if run.reference is not None and not rl.kl.in_reward else None
    critic_guard = life.guard_for(run.critic_optimizer)
    log = life.open_log(run.report, headline=("rewards/total/mean", "accuracy", "kl_per_seq"), progress=progress,
                        train_rows=train_rows, eval_rows=eval_rows)  # fmt: skip
    params, greedy = sampling_params(rl.sampling, tokenizer.eos_token_id)
    engine = ENGINES[rl.engine]

    def draw() -> Scored:
        prompts = [run.train[i] for i in run.sampler.take(rl.prompts_per_step)]
        prompts = prompts[life.ranks.contiguous_share(len(prompts))]  # a group never straddles ranks
        return sample_and_score(engine, model, tokenizer, run.reward_set, prompts, params, group_size=rl.group_size,
                                generator=life.generator, reward_kwargs=reward_kwargs,
                                environment=run.environments, limits=run.limits)  # fmt: skip

    life.evaluate_before((lambda: eval_metrics(evaluate_policy(cfg, run))) if run.eval_prompts else None,
                         say="before training")  # fmt: skip
    model.train()
    with life.stop_requests(), closing(run.reward_set):
        for step in life.steps():
            started = time.perf_counter()
            reward_log = RewardLog()
            reward_kwargs = trl_reward_kwargs(trainer_state(step, cfg.train.max_steps), reward_log)
            scored = draw_step(draw, rl.prompts_per_step, rl.dynamic_sampling_max_batches if rl.dynamic_sampling else 0)
            rollouts = scored.rollouts
            life.log_samples(step + 1, partial(sample_table, tokenizer, scored.prompts, rollouts.completion_ids,
                                               rollouts.group_size, scored.rewards, reward_log.columns))  # fmt: skip
            padded, layout = scored.rollouts.to_training_rows(tokenizer.pad_token_id, life.device)
            available = {"rewards_PG": scored.rewards.total.to(life.device), "group_size": scored.rollouts.group_size}
            if "greedy_rollout" in objectives.advantage.needs:
                available["greedy_rewards_P"] = greedy_rewards(run, engine, scored, greedy, life.device, reward_kwargs)
            if "moving_baseline" in objectives.advantage.needs:
                available["baseline"] = torch.tensor(run.baseline.value, device=life.device)
            tensors, kl_B_T = prepare_step(
                padded, available, objectives, advantage_args=rl.advantage_args, reference=run.reference,
                critic=run.critic, kl_coef=run.kl_coef, kl_in_reward=rl.kl.in_reward,
                temperature=params.temperature, micro_batch_size=rl.micro_batch_size,
                episodes=EpisodeView.of(scored.rollouts, tokenizer.pad_token_id, life.device, layout, padded),
                ranks=life.ranks,
            )  # fmt: skip
            prepared = time.perf_counter()

            stats, num_seqs = UpdateStats(), len(padded.loss_mask_B_T)
            trained_rows = torch.arange(num_seqs) if rl.filtration is None else filtered_rows(
                scored.rewards.total[row_episodes(layout, num_seqs)], **rl.filtration.model_dump(),
                generator=life.generator)  # fmt: skip
            for _ in range(rl.epochs):
                shuffled = rl.minibatches > 1
                order = trained_rows[torch.randperm(num_seqs, generator=life.generator)] if shuffled else trained_rows
                for rows in order.chunk(rl.minibatches):
                    update_minibatch(
                        model, run.critic, tensors, rows.to(life.device), policy_loss=objectives.policy_loss,
                        policy_loss_args=rl.policy_loss_args, aggregation=objectives.aggregation,
                        kl_estimator=kl_in_loss, kl_coef_in_loss=run.kl_coef, entropy_coef=rl.entropy_coef,
                        value_coef=rl.value.coef, value_clip_range=rl.value.clip_range,
                        temperature=params.temperature, max_len=params.max_new_tokens,
                        micro_batch_size=rl.micro_batch_size, stats=stats, ranks=life.ranks,
                    )  # fmt: skip
                    sum_gradients(list(model.parameters()), life.ranks)
                    stats.add("grad_norm", life.guard.step(model.parameters(), run.optim.optimizer,
                                                           cfg.train.max_grad_norm, step=step + 1))  # fmt: skip
                    if run.critic is not None:
                        sum_gradients(list(run.critic.parameters()), life.ranks)
                        critic_guard.step(run.critic.parameters(), run.critic_optimizer, cfg.train.max_grad_norm,
                                          step=step + 1)  # fmt: skip
            life.step_schedule()
            trained = time.perf_counter()

            all_seqs = int(all_reduce_sum(float(num_seqs), life.ranks))
            observed_kl = all_reduce_sum(kl_B_T.sum().item(), life.ranks) / max(1, all_seqs)  # per sequence, sampled
            if rl.kl.target is not None and run.reference is not None:
                run.kl_coef = float(adaptive_kl_coef(run.kl_coef, observed_kl, target=rl.kl.target,
                                                     horizon=rl.kl.horizon, n_steps=all_seqs))  # fmt: skip
            rewards = gather_rewards(scored.rewards, life.ranks)
            run.baseline.update(gather_rows({"r": tensors.rewards_PG}, life.ranks, rows_of="r")[0]["r"])
            num_tokens = int(all_reduce_sum(float(padded.loss_mask_B_T.sum()), life.ranks))
            stats.sums = {key: all_reduce_sum(value, life.ranks) for key, value in sorted(stats.sums.items())}
            stats.sums["grad_norm"] /= life.ranks.world  # the same norm on every rank, summed above
            metrics = {
                **reward_metrics(rewards, verifier=cfg.eval.reward),
                **stats.means(rl.epochs * rl.minibatches, num_tokens * rl.epochs),
                **step_metrics(scored, observed_kl, run.kl_coef, num_tokens * rl.epochs, trained - prepared),
                **life.step_metrics(trained - started),
                **({"rewards/kl_shaped/mean": tensors.rewards_PG.mean().item()} if rl.kl.in_reward else {}),
                **reward_log.means(),
            }
            done = step + 1
            if life.eval_due(done) and run.eval_prompts:
                metrics |= life.evaluate(lambda: eval_metrics(evaluate_policy(cfg, run)))
            life.end_step(done, metrics)

    final_eval = None

    def evaluate_at_end() -> dict[str, float]:
        nonlocal final_eval
        final_eval = evaluate_policy(cfg, run)
        return eval_metrics(final_eval)

    final_metrics = life.evaluate(evaluate_at_end) if run.eval_prompts else {}
    if final_eval is not None:
        log.print(f"eval: greedy accuracy {final_eval.greedy_accuracy:.4f} on {final_eval.num_prompts} prompts")
    return life.finish(final_metrics, eval=final_eval, initial_eval=life.before, say=None)


def build_rl_run(
    cfg: RLConfig, life: Lifecycle, *, model: Any, tokenizer: Any, train_rows: Rows | None, eval_rows: Rows | None,
    rewards: list[Any] | None, progress: bool = True,
) -> RLRun:  # fmt: skip
    """The policy, its reference (only when a KL term needs one), the critic (only for an advantage that needs
    one), the rewards, the encoded prompts, the optimisers; on a resume, the checkpoint's state restored."""
    rl = cfg.rl
    if life.sharded:
        raise ConfigError("train.parallel: fsdp is for sft, offline pref and rm; RL samples on each rank apart, "
                          "which sharded weights cannot (use ddp)")  # fmt: skip
    if rl.prompts_per_step % life.ranks.world:
        raise ConfigError(f"rl.prompts_per_step={rl.prompts_per_step} does not divide among {life.ranks.world} "
                          "ranks (each rank samples whole groups of its share of the prompts)")  # fmt: skip
    model, tokenizer, reference = policy_and_reference(
        cfg.model, model, tokenizer, life.checkpoint, needs_reference=rl.kl.coef > 0, seed=cfg.seed,
        device=life.device, recipe_dir=cfg.recipe_dir, run_dir=life.run_dir,
    )  # fmt: skip
    prompt_key = "rl.max_prompt_length" if rl.max_prompt_length else "data.max_length"
    new_tokens = {"rl.sampling.max_new_tokens": rl.sampling.max_new_tokens}
    check_positions(model, {prompt_key: rl.max_prompt_length or cfg.data.max_length, **new_tokens})
    critic = ValueModel(model).to(life.device) if "critic" in ADVANTAGES[rl.advantage].needs else None
    critic_lr = rl.value.lr or cfg.train.lr
    critic_optimizer = None if critic is None else build_adamw(
        critic.parameters(), lr=critic_lr, weight_decay=0.0, betas=cfg.train.adam_betas)  # fmt: skip
    where = {"seed": cfg.seed, "recipe_dir": cfg.recipe_dir, "max_length": rl.max_prompt_length}
    reward_set = build_reward_set(cfg.rewards, rewards, cfg.recipe_dir, max_failure_fraction=cfg.max_failure_fraction)
    with phase("reading and encoding the prompts", enabled=progress):
        train, report = load_prompts(cfg.data, tokenizer, "train", rows=train_rows, **where)
        train = scorable_prompts(train, reward_set.required_columns(), on_bad_row=cfg.data.on_bad_row, report=report)
        eval_split, _ = load_prompts(cfg.data, tokenizer, "eval", rows=eval_rows, limit=cfg.eval.limit, **where)
    cfg = life.fit_epochs(len(train), rl.prompts_per_step)
    run = RLRun(
        model=model, tokenizer=tokenizer, reference=reference, critic=critic, critic_optimizer=critic_optimizer,
        reward_set=reward_set, train=train, eval_prompts=[p for p in eval_split if "answer" in p.extra],
        eval_reward=load_reward_fn(cfg.eval.reward, base_dir=cfg.recipe_dir), report=report,
        optim=build_optimisation(model, cfg.train), sampler=EpochSampler(len(train), seed=cfg.seed, report=report),
        baseline=MovingBaseline(), kl_coef=rl.kl.coef,
        environments=build_environments(cfg.env, tokenizer=tokenizer, base_dir=cfg.recipe_dir),
        limits=episode_limits(cfg.env),
    )  # fmt: skip

    def extra_state() -> dict[str, Any]:
        state: dict[str, Any] = {"baseline": {"value": run.baseline.value, "steps": run.baseline.steps},
                                 "kl_coef": run.kl_coef}  # fmt: skip
        if run.critic is not None:
            state |= {"critic": run.critic.state_dict(), "critic_optimizer": run.critic_optimizer.state_dict()}
        return state

    def restore_extra(state: dict[str, Any]) -> None:
        if run.critic is not None:
            run.critic.load_state_dict(state["critic"])
            run.critic_optimizer.load_state_dict(state["critic_optimizer"])
            for group in run.critic_optimizer.param_groups:  # a changed train.lr (or rl.value.lr) applies
                group["lr"] = critic_lr
        run.baseline = MovingBaseline(**state["baseline"])
        run.kl_coef = state["kl_coef"]

    life.track(model, tokenizer, run.optim, run.sampler, extra_state=extra_state, restore_extra=restore_extra)
    return run


def greedy_rewards(
    run: RLRun, engine: Any, scored: Scored, greedy: Any, device: torch.device, reward_kwargs: dict[str, Any]
) -> Tensor:
    """ReMax's baseline: the reward of each prompt's greedy episode ([P])."""
    envs: list[Any] = []
    rollouts = sample_episodes(engine, run.model, scored.prompts, greedy, n=1, generator=None, tokenizer=run.tokenizer,
                               environment=run.environments, limits=run.limits, envs_out=envs)  # fmt: skip
    scores = score_episodes(run.reward_set, run.tokenizer, scored.prompts, rollouts, 1, reward_kwargs,
                            environments=None if run.environments.single_turn else envs)  # fmt: skip
    return scores.total.to(device)


def episode_limits(section: Any) -> EpisodeLimits:
    return EpisodeLimits(max_turns=section.max_turns, max_total_tokens=section.max_total_tokens,
                         mask_truncated=section.mask_truncated, mask_failed=section.mask_failed)  # fmt: skip


def evaluate_policy(cfg: RLConfig, run: RLRun) -> EvalResult:
    """Held-out greedy accuracy (and pass@k), with its own generator so that it never shifts training's."""
    return evaluate_with(run.model, run.tokenizer, run.eval_prompts, run.eval_reward, cfg.eval,
                         generator=sampling_generator(cfg.seed), environment=run.environments,
                         limits=run.limits)  # fmt: skip


def eval_metrics(result: EvalResult) -> dict[str, float]:
    return {f"eval_{k}": v for k, v in result.metrics().items()}


def step_metrics(scored: Scored, kl: float, kl_coef: float, trained_tokens: int, train_s: float) -> dict[str, float]:
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
        **episode_metrics(rollouts.stats),
    }


def episode_metrics(stats: Mapping[str, float]) -> dict[str, float]:
    """Per-episode means of the episodes' counts (turns, tool calls, ...), the shares truncated, failed and split,
    and the time split between the engine (`time/gen_s`) and the environments and their tools (`time/env_s`)."""
    count = max(1.0, stats.get("episodes/count", 0.0))
    return {key: value if key.startswith("time/") or key == "episodes/count" else value / count
            for key, value in stats.items()}  # fmt: skip


# --- the update ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Objectives:
    """The registered functions a run's config names, looked up once."""

    advantage: Callable[..., Any]
    policy_loss: Callable[..., Any]
    aggregation: Callable[..., Any]
    kl_estimator: Callable[..., Any]


@dataclass
class MovingBaseline:
    """Exponential moving average of past batch mean rewards (the `moving_baseline` need)."""

    value: float = 0.0
    steps: int = 0

    def update(self, rewards_PG: Tensor) -> None:
        mean = rewards_PG.mean().item()
        self.value = mean if self.steps == 0 else BASELINE_DECAY * self.value + (1 - BASELINE_DECAY) * mean
        self.steps += 1


@dataclass
class StepTensors:
    """One step's rollouts as tensors on the training device, plus what the objectives consume."""

    padded: PaddedRollouts
    adv_B_T: Tensor
    rewards_PG: Tensor
    """The sequence rewards the advantage read: the step's, minus coef * summed KL when the KL is in the reward."""
    ref_logp_B_T: Tensor | None = None
    old_values_B_T: Tensor | None = None
    returns_B_T: Tensor | None = None
    row_inputs: dict[str, Tensor] = field(default_factory=dict)
    """Per-row [B] inputs the policy loss's signature names beyond the common four (`group_rewards`: NFT)."""


@dataclass
class UpdateStats:
    """Sums over a step's updates, turned into per-token means by `means`."""

    sums: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value

    def means(self, num_updates: int, token_visits: int) -> dict[str, float]:
        """`tok/` sums over `token_visits` (tokens x epochs), the others over `num_updates`."""
        out = {k.removeprefix("tok/"): v / max(1, token_visits) for k, v in self.sums.items() if k.startswith("tok/")}
        return out | {k: v / max(1, num_updates) for k, v in self.sums.items() if not k.startswith("tok/")}


def row_episodes(layout: SampleLayout | None, num_rows: int) -> Tensor:
    """[B] the episode each training row belongs to (the rows are the episodes without a layout)."""
    return torch.arange(num_rows) if layout is None else layout.episode_of_B.cpu()


@dataclass
class EpisodeView:
    """The step's episodes as the estimators read them: one row per episode (`Rollouts.to_padded`), whatever
    training rows a split episode became (`Rollouts.to_training_rows`); `layout` maps between the two (None: the
    rows are the episodes)."""

    mask_E_T: Tensor
    """[P*G, T_e] the model tokens of each episode, in training (after masked episodes were taken out)."""
    step_rewards_E_T: Tensor | None
    """[P*G, T_e] the environments' per-turn rewards at their turns' last tokens; None without any."""
    turn_ids_E_T: Tensor
    """[P*G, T_e] int64 each model token's turn, -1 elsewhere."""
    layout: SampleLayout | None = None

    @staticmethod
    def of(rollouts: Rollouts, pad_id: int, device: torch.device, layout: SampleLayout | None,
           rows: PaddedRollouts) -> EpisodeView:  # fmt: skip
        episodes = rows if layout is None else rollouts.to_padded(pad_id, device)
        mask_E_T = episodes.loss_mask_B_T
        return EpisodeView(mask_E_T, rollouts.step_rewards_B_T(episodes), rollouts.turn_ids_B_T(episodes), layout)

    def per_row(self, x_E: Tensor) -> Tensor:
        """[P*G] per-episode values -> [B], each training row's episode's."""
        return x_E if self.layout is None else x_E[self.layout.episode_of_B]

    def to_episodes(self, x_B_T: Tensor) -> Tensor:
        return x_B_T if self.layout is None else self.layout.to_episodes(x_B_T)

    def to_rows(self, x_E_T: Tensor, rows_shape: tuple[int, ...]) -> Tensor:
        return x_E_T if self.layout is None else self.layout.to_rows(x_E_T, (rows_shape[0], rows_shape[1]))


def prepare_step(
    padded: PaddedRollouts,
    available: dict[str, Any],
    objectives: Objectives,
    *,
    advantage_args: Mapping[str, Any],
    reference: Reference | None,
    critic: ValueModel | None,
    kl_coef: float,
    kl_in_reward: bool,
    temperature: float,
    micro_batch_size: int | None,
    episodes: EpisodeView | None = None,
    ranks: Ranks = ONE_PROCESS,
) -> tuple[StepTensors, Tensor]:
    """The step's advantages (and the critic's targets), with the inputs the estimator's signature names.

    `available` holds the step's rewards and whatever else the loop has already supplied (group size,
    greedy-rollout rewards, the moving baseline). With the KL in the reward, both the token rewards and the
    sequence rewards are shaped, r - coef * sum_t KL_t for the latter (RLOO, arXiv:2402.14740, and TRL shape the
    reward before the baseline), so every estimator sees it whichever it reads. The token rewards are the
    episode's outcome (its rewards but the environment's) on its last model token plus the environment's per-turn
    rewards on their turns' last tokens, so that their sum is the sequence reward.

    The forwards (reference, critic) run on the training rows (`padded`); the estimators read whole episodes
    (`episodes`), and their per-token outputs go back to the rows. Returns the tensors the updates consume and the
    per-token KL to the reference at sampling time ([B, T] of the rows, zeros without a reference).

    Data-parallel, each rank's episodes are its own groups; the estimator runs on every rank's inputs together
    (`gather_rows`), so that one normalising over the batch (REINFORCE++) gives what one process would.
    """
    mask_B_T = padded.loss_mask_B_T
    view = episodes or EpisodeView(mask_B_T, None, torch.where(mask_B_T, 0, -1))
    mask_E_T = view.mask_E_T
    tensors = StepTensors(padded, adv_B_T=torch.empty(0), rewards_PG=available["rewards_PG"])
    if "group_rewards" in objectives.policy_loss.needs:
        tensors.row_inputs = {key: view.per_row(value_E) for key, value_E in
                              group_reward_inputs(available["rewards_PG"], available["group_size"]).items()}
    outcome_PG = available["rewards_PG"]
    if view.step_rewards_E_T is not None:
        outcome_PG = outcome_PG - view.step_rewards_E_T.sum(dim=1)
    token_rewards_E_T = outcome_at_last_token(outcome_PG, mask_E_T)
    if view.step_rewards_E_T is not None:
        token_rewards_E_T = token_rewards_E_T + view.step_rewards_E_T
    kl_B_T = torch.zeros(mask_B_T.shape, device=mask_B_T.device)
    if reference is not None:
        with reference.active():
            tensors.ref_logp_B_T = sequence_forward(
                reference.model, lambda m, i, a, t: token_logprobs(m, i, a, t, temperature=temperature)[0], padded,
                micro_batch_size,
            )  # fmt: skip
        old, ref = padded.old_logp_B_T, tensors.ref_logp_B_T  # at sampling time pi = pi_old
        at_sampling = {"logp_B_T": old, "old_logp_B_T": old, "ref_logp_B_T": ref}
        kl_B_T = torch.where(mask_B_T, call_with(objectives.kl_estimator, at_sampling), 0.0)
        if kl_in_reward:
            kl_E_T = view.to_episodes(kl_B_T)
            token_rewards_E_T = token_rewards_E_T - kl_coef * kl_E_T
            tensors.rewards_PG = available["rewards_PG"] - kl_coef * kl_E_T.sum(dim=1)
    available = available | {
        "mask_B_T": mask_E_T, "token_rewards_B_T": token_rewards_E_T, "rewards_PG": tensors.rewards_PG,
        "turn_ids_B_T": view.turn_ids_E_T,
    }  # fmt: skip
    if critic is not None:
        values_B_T = sequence_forward(critic, lambda m, i, a, t: m(i, a, t), padded, micro_batch_size)
        tensors.old_values_B_T = torch.where(mask_B_T, values_B_T, 0.0)
        available["values_B_T"] = view.to_episodes(tensors.old_values_B_T)
        tensors.returns_B_T = view.to_rows(call_with(lambda_returns, available, advantage_args), mask_B_T.shape)
    everyone, mine = gather_rows(available, ranks, rows_of="rewards_PG")
    adv = call_with(objectives.advantage, everyone, advantage_args)[mine]
    adv_E_T = per_token(adv if adv.dim() == 1 else adv[:, : mask_E_T.shape[1]], mask_E_T)
    tensors.adv_B_T = view.to_rows(adv_E_T, mask_B_T.shape)
    return tensors, kl_B_T


def update_minibatch(
    policy: Any,
    critic: ValueModel | None,
    step: StepTensors,
    rows: Tensor,
    *,
    policy_loss: Callable[..., Any],
    policy_loss_args: Mapping[str, Any],
    aggregation: Callable[..., Any],
    kl_estimator: Callable[..., Any] | None,
    kl_coef_in_loss: float,
    entropy_coef: float,
    value_coef: float,
    value_clip_range: float,
    temperature: float,
    max_len: int,
    micro_batch_size: int | None,
    stats: UpdateStats,
    ranks: Ranks = ONE_PROCESS,
) -> None:
    """Accumulate the gradients of one minibatch (`rows` of the step), micro-batch by micro-batch.

    Aggregation divides by the minibatch's counts (tokens, sequences), so the summed micro-batch losses
    equal the whole minibatch's loss whatever `micro_batch_size` is; data-parallel, the counts are every rank's, so
    the gradients summed over ranks equal one process's."""
    p = step.padded
    local = {"num_tokens": float(p.loss_mask_B_T[rows].sum()), "num_seqs": float(len(rows))}
    counts = {key: int(all_reduce_sum(value, ranks)) for key, value in local.items()} | {"max_len": max_len}
    size = micro_batch_size or len(rows)
    for start in range(0, len(rows), size):
        mb = rows[start : start + size]
        ids_B_T, attn_B_T, mask_B_T = p.input_ids_B_T[mb], p.attention_mask_B_T[mb], p.loss_mask_B_T[mb]
        logp_B_T, entropy_B_T = token_logprobs(policy, ids_B_T, attn_B_T, mask_B_T, temperature=temperature)
        inputs = {"logp_B_T": logp_B_T, "old_logp_B_T": p.old_logp_B_T[mb], "adv_B_T": step.adv_B_T[mb],
                  "mask_B_T": mask_B_T, **{key: value[mb] for key, value in step.row_inputs.items()}}  # fmt: skip
        surrogate_B_T, clipped_B_T = call_with(policy_loss, inputs, policy_loss_args)
        kl_B_T = None  # the estimator gets its inputs by name: k3_bias_corrected reads old_logp_B_T too
        if kl_estimator is not None:
            kl_B_T = call_with(kl_estimator, {**inputs, "ref_logp_B_T": step.ref_logp_B_T[mb]})
        loss_B_T = policy_objective(surrogate_B_T, mask_B_T, kl_B_T=kl_B_T, kl_coef=kl_coef_in_loss,
                                    entropy_B_T=entropy_B_T, entropy_coef=entropy_coef)  # fmt: skip
        loss = call_with(aggregation, {"loss_B_T": loss_B_T, "mask_B_T": mask_B_T, **counts})
        loss.backward()
        stats.add("loss", loss.item())
        if kl_B_T is not None:
            stats.add("tok/kl", kl_B_T.detach()[mask_B_T].sum().item())
        stats.add("tok/clip_fraction", clipped_B_T[mask_B_T].sum().item())
        stats.add("tok/entropy", entropy_B_T[mask_B_T].detach().sum().item())
        stats.add("tok/sampler_logp_gap", (logp_B_T - p.old_logp_B_T[mb])[mask_B_T].detach().abs().sum().item())
        if critic is not None:
            values_B_T = critic(ids_B_T, attn_B_T, mask_B_T)
            v_loss_B_T = clipped_value_loss(values_B_T, step.old_values_B_T[mb], step.returns_B_T[mb],
                                            clip_range=value_clip_range)  # fmt: skip
            v_loss = critic_objective(call_with(aggregation, {"loss_B_T": v_loss_B_T, "mask_B_T": mask_B_T, **counts}),
                                      value_coef=value_coef)  # fmt: skip
            v_loss.backward()
            stats.add("value_loss", v_loss.item())


@torch.no_grad()
def sequence_forward(
    net: Any, fn: Callable[..., Tensor], padded: PaddedRollouts, micro_batch_size: int | None
) -> Tensor:
    """fn(net, input_ids, attention_mask, loss_mask) over the step's rows, micro-batch by micro-batch (memory only)."""
    rows = len(padded.loss_mask_B_T)
    size = micro_batch_size or rows
    return torch.cat([fn(net, padded.input_ids_B_T[s : s + size], padded.attention_mask_B_T[s : s + size],
                         padded.loss_mask_B_T[s : s + size]) for s in range(0, rows, size)])  # fmt: skip


def gather_rewards(rewards: RewardResult, ranks: Ranks) -> RewardResult:
    """Every rank's scores of the step, for the metrics one process would log; the rank's own for one process."""
    if not ranks.distributed:
        return rewards
    parts = all_gather_objects(rewards, ranks)
    return RewardResult(
        total=torch.cat([p.total for p in parts]),
        per_reward={k: torch.cat([p.per_reward[k] for p in parts]) for k in rewards.per_reward},
        failures={k: sum(p.failures[k] for p in parts) for k in rewards.failures},
        metrics={},
    )
