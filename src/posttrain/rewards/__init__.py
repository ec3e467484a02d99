"""Rewards: the reward protocol, built-in verifiers and shaping terms, reward-model scoring, ensembles,
and the weighted, failure-isolated `RewardSet` that a training loop calls once per batch.

    rewards = RewardSet.from_specs([RewardSpec("numeric_match"), RewardSpec("format", weight=0.1)])
    result = rewards.score(prompts, completions, completion_ids, {"answer": answers})
    result.total  # [N]

Heavy or optional parts (transformers models, math-verify, the code sandbox) are imported only when a
reward that needs them is built.
"""

from posttrain.rewards.base import (
    RewardFailureError,
    RewardFunction,
    RewardLoadError,
    RewardSpec,
    completion_text,
)
from posttrain.rewards.loading import BUILTIN_REWARDS, default_reward_name, load_reward_fn
from posttrain.rewards.scoring import (
    LoadedReward,
    RewardCall,
    RewardResult,
    RewardSet,
    call_within,
    current_reward_call,
    describe_failure,
)

__all__ = [
    "BUILTIN_REWARDS",
    "LoadedReward",
    "RewardCall",
    "RewardFailureError",
    "RewardFunction",
    "RewardLoadError",
    "RewardResult",
    "RewardSet",
    "RewardSpec",
    "call_within",
    "completion_text",
    "current_reward_call",
    "default_reward_name",
    "describe_failure",
    "load_reward_fn",
]
