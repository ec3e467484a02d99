"""Environments: single-turn prompts and multi-turn episodes with tool output, and the episode driver."""

from posttrain.envs.base import Environment, StepResult, run_episodes
from posttrain.envs.single_turn import SingleTurnEnv

__all__ = ["Environment", "SingleTurnEnv", "StepResult", "run_episodes"]
