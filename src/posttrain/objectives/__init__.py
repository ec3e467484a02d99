"""Pure objectives: advantages, policy losses, aggregation, KL, value, preference, reward-model, process-reward and
distillation losses.

Importing this package registers every built-in objective in the registries of `registry.py`.
"""

from posttrain.objectives import (  # noqa: F401  (imported to register)
    advantages,
    aggregation,
    distillation,
    kl,
    online_preference,
    pairing,
    policy_losses,
    preference,
    process_rewards,
    reward_model,
    value,
)
from posttrain.objectives.registry import (
    ADVANTAGES,
    AGGREGATIONS,
    ALL_REGISTRIES,
    DISTILLATION_LOSSES,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    PREFERENCE_LOSSES,
    REWARD_MODEL_LOSSES,
    UnknownObjectiveError,
)

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "ALL_REGISTRIES",
    "DISTILLATION_LOSSES",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "PREFERENCE_LOSSES",
    "REWARD_MODEL_LOSSES",
    "UnknownObjectiveError",
]
