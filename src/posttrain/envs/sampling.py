"""Every online sample comes from an environment: a step's prompts become episodes (`run_episodes`), played by an
engine with the policy, then scored. The single-turn environment, whose episode is the prompt and one answer, is
the default; the agents' environments (`envs.registry`) plug in here and nowhere else.

    scored = sample_and_score(engine, policy, tokenizer, rewards, prompts, params, group_size=8, generator=g)

Scoring an episode calls the rewards as TRL's GRPOTrainer calls them after its tool loop: an episode whose
environment reports its `messages` (the turns after the prompt) passes them as the completion, and the
environments themselves are passed as `environments`. An environment's own per-turn rewards are added to the
total as the reward `env`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from posttrain.data.encoding import PromptTokens
from posttrain.envs.base import Environment, run_episodes
from posttrain.envs.registry import EnvironmentMix
from posttrain.envs.single_turn import SingleTurnEnv
from posttrain.rewards import RewardResult, RewardSet
from posttrain.rewards.inputs import score_completions
from posttrain.rollout import Rollouts, SamplingParams
from posttrain.rollout.groups import Scored

EnvironmentFactory = Callable[[], Environment]
ENV_REWARD = "env"
"""The name the environments' own rewards are logged and summed under."""


@dataclass(frozen=True)
class EpisodeLimits:
    """How long an episode may run and which episodes train (a config's `env` section)."""

    max_turns: int = 8
    max_total_tokens: int | None = None
    mask_truncated: bool = False
    mask_failed: bool = True


NO_LIMITS = EpisodeLimits()
"""The defaults: 8 turns, no token limit, truncated episodes trained, failed ones not."""


def as_mix(environment: EnvironmentFactory | EnvironmentMix) -> EnvironmentMix:
    return environment if isinstance(environment, EnvironmentMix) else EnvironmentMix(environment)


def episode_rows(prompts: list[PromptTokens]) -> list[dict[str, Any]]:
    """What `Environment.reset` receives: the row's columns, its prompt as written (`prompt`) and encoded."""
    return [{**p.extra, "prompt": p.prompt, "prompt_ids": p.prompt_ids} for p in prompts]


def sample_episodes(
    engine: Any,
    model: Any,
    prompts: list[PromptTokens],
    params: SamplingParams,
    *,
    n: int,
    generator: torch.Generator | None,
    tokenizer: Any,
    environment: EnvironmentFactory | EnvironmentMix = SingleTurnEnv,
    limits: EpisodeLimits = NO_LIMITS,
    envs_out: list[Environment] | None = None,
) -> Rollouts:
    """n episodes of each prompt (each group's n contiguous), the model in eval mode while it samples. `envs_out`,
    when given, receives the P*G environments played."""
    mix = as_mix(environment)
    rows = episode_rows(prompts)
    envs = [mix.make(rows[i // n]) for i in range(len(prompts) * n)]
    if envs_out is not None:
        envs_out.extend(envs)
    was_training = model.training
    model.eval()
    try:
        return run_episodes(engine, model, envs, rows, params, n=n, generator=generator, tokenizer=tokenizer,
                            max_turns=limits.max_turns, max_total_tokens=limits.max_total_tokens)  # fmt: skip
    finally:
        model.train(was_training)


def sample_and_score(
    engine: Any,
    policy: Any,
    tokenizer: Any,
    reward_set: RewardSet,
    prompts: list[PromptTokens],
    params: SamplingParams,
    *,
    group_size: int,
    generator: torch.Generator,
    reward_kwargs: dict[str, Any] | None = None,
    environment: EnvironmentFactory | EnvironmentMix = SingleTurnEnv,
    limits: EpisodeLimits = NO_LIMITS,
) -> Scored:
    """A step's groups: `group_size` episodes of each prompt, scored by the rewards (`rewards.inputs`)."""
    started = time.perf_counter()
    envs: list[Environment] = []
    rollouts = sample_episodes(engine, policy, prompts, params, n=group_size, generator=generator,
                               tokenizer=tokenizer, environment=environment, limits=limits, envs_out=envs)  # fmt: skip
    generated = time.perf_counter()
    rewards = score_episodes(reward_set, tokenizer, prompts, rollouts, group_size, reward_kwargs,
                             environments=None if as_mix(environment).single_turn else envs)  # fmt: skip
    mask_episodes(rollouts, limits)
    return Scored(prompts, rollouts, rewards, generated - started, time.perf_counter() - generated)


def score_episodes(
    reward_set: RewardSet,
    tokenizer: Any,
    prompts: list[PromptTokens],
    rollouts: Rollouts,
    n: int,
    reward_kwargs: dict[str, Any] | None,
    *,
    environments: list[Environment] | None = None,
) -> RewardResult:
    """The rewards of P*n episodes, plus the environments' own (`env`) where they gave any."""
    messages = [info.get("messages") for info in rollouts.infos]
    completions = messages if all(m is not None for m in messages) else None
    extra = dict(reward_kwargs or {}) | ({"environments": environments} if environments is not None else {})
    result = score_completions(reward_set, tokenizer, prompts, rollouts.completion_ids, n, extra,
                               completions=completions)  # fmt: skip
    env_rewards = rollouts.env_rewards()
    if env_rewards is None:
        return result
    env_N = torch.tensor(env_rewards, dtype=torch.float32)
    metrics = result.metrics | {f"rewards/{ENV_REWARD}/mean": env_N.mean().item(),
                                f"rewards/{ENV_REWARD}/std": env_N.std(unbiased=False).item()}  # fmt: skip
    total = result.total + env_N
    metrics |= {"rewards/total/mean": total.mean().item(), "rewards/total/std": total.std(unbiased=False).item()}
    return RewardResult(total=total, per_reward=result.per_reward | {ENV_REWARD: env_N}, failures=result.failures,
                        metrics=metrics)  # fmt: skip


def mask_episodes(rollouts: Rollouts, limits: EpisodeLimits) -> None:
    """Take the truncated episodes (when `mask_truncated`) and the failed ones (when `mask_failed`) out of the loss:
    their model-token masks become all False. Their rewards were already scored and still count in baselines."""
    for i, (reason, info) in enumerate(zip(rollouts.finish_reasons, rollouts.infos)):
        failed = "env_error" in info and limits.mask_failed
        if (reason == "length" and limits.mask_truncated) or failed:
            rollouts.model_token_mask[i] = torch.zeros_like(rollouts.model_token_mask[i])
