"""Every online sample comes from an environment: a step's prompts become episodes (`run_episodes`), played by an
engine with the policy, then scored. The single-turn environment, whose episode is the prompt and one answer, is
the default; the agents' environments plug in here and nowhere else.

    scored = sample_and_score(engine, policy, tokenizer, rewards, prompts, params, group_size=8, generator=g)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from posttrain.data.encoding import PromptTokens
from posttrain.envs.base import Environment, run_episodes
from posttrain.envs.single_turn import SingleTurnEnv
from posttrain.rewards import RewardSet
from posttrain.rewards.inputs import score_completions
from posttrain.rollout import Rollouts, SamplingParams
from posttrain.rollout.groups import Scored

EnvironmentFactory = Callable[[], Environment]


def sample_episodes(
    engine: Any,
    model: Any,
    prompts: list[PromptTokens],
    params: SamplingParams,
    *,
    n: int,
    generator: torch.Generator | None,
    tokenizer: Any,
    environment: EnvironmentFactory = SingleTurnEnv,
) -> Rollouts:
    """n episodes of each prompt (each group's n contiguous), the model in eval mode while it samples."""
    rows = [{"prompt_ids": p.prompt_ids, **p.extra} for p in prompts]
    envs = [environment() for _ in range(len(prompts) * n)]
    was_training = model.training
    model.eval()
    try:
        return run_episodes(engine, model, envs, rows, params, n=n, generator=generator, tokenizer=tokenizer)
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
    environment: EnvironmentFactory = SingleTurnEnv,
) -> Scored:
    """A step's groups: `group_size` episodes of each prompt, scored by the rewards (`rewards.inputs`)."""
    started = time.perf_counter()
    rollouts = sample_episodes(engine, policy, prompts, params, n=group_size, generator=generator,
                               tokenizer=tokenizer, environment=environment)  # fmt: skip
    generated = time.perf_counter()
    rewards = score_completions(reward_set, tokenizer, prompts, rollouts.completion_ids, group_size, reward_kwargs)
    return Scored(prompts, rollouts, rewards, generated - started, time.perf_counter() - generated)
