"""Environments: single-turn prompts and multi-turn episodes with tool output, the episode driver, and the
sampling path every online sample takes through them."""

from posttrain.envs.base import Environment, StepResult, run_episodes
from posttrain.envs.sampling import sample_and_score, sample_episodes
from posttrain.envs.single_turn import SingleTurnEnv

__all__ = ["Environment", "SingleTurnEnv", "StepResult", "run_episodes", "sample_and_score", "sample_episodes"]
