"""Environments: single-turn prompts and multi-turn episodes with tool output, the episode driver, the registry of
environments, and the sampling path every online sample takes through them (docs/agents.md)."""

from posttrain.envs.base import Environment, StepResult, run_episodes
from posttrain.envs.registry import ENVIRONMENTS, EnvironmentMix, build_environments, environment_factory
from posttrain.envs.sampling import EpisodeLimits, sample_and_score, sample_episodes
from posttrain.envs.single_turn import SingleTurnEnv

__all__ = [
    "ENVIRONMENTS", "Environment", "EnvironmentMix", "EpisodeLimits", "SingleTurnEnv", "StepResult",
    "build_environments", "environment_factory", "run_episodes", "sample_and_score", "sample_episodes",
]  # fmt: skip
