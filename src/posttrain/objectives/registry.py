"""Registries of pure objective functions, and the decorators that fill them.

Every objective is a plain function of tensors registered under a name, with `needs`: the extra
inputs the training loop must supply (a reference model's log-probs, group statistics, a critic's
values, ...). Loops look objectives up by the name in the config and hand over what `needs` asks
for; they never compare an objective's name to a string. A user registers their own objective with
the same decorator from their own file; built-ins have no privileges a user function lacks.

This module imports nothing else of posttrain (DESIGN.md: `objectives/` is the bottom of the stack).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def call_with(fn: Callable[..., Any], available: Mapping[str, Any], hyper: Mapping[str, Any] | None = None) -> Any:
    """Call an objective with the parameters its signature names: from `hyper` first, then `available`.

    This is how every loop calls every objective, so none ever looks at an objective's name. A parameter
    named by neither keeps its default; keys the function does not name are not passed (configs reject
    unknown hyper-parameters at load time).
    """
    hyper = hyper or {}
    kwargs = {}
    for name in inspect.signature(fn).parameters:
        if name in hyper:
            kwargs[name] = hyper[name]
        elif name in available:
            kwargs[name] = available[name]
    return fn(**kwargs)


class UnknownObjectiveError(LookupError):
    """A name that no objective was registered under."""

    def __str__(self) -> str:  # LookupError would quote the message
        return str(self.args[0])


class Registry(dict[str, Callable[..., Any]]):
    """Name -> function. `needs` and `name` are attached to each registered function."""

    def __init__(self, kind: str, allowed_needs: Iterable[str]):
        super().__init__()
        self.kind = kind
        self.allowed_needs = frozenset(allowed_needs)

    def register(self, name: str, *, needs: Iterable[str] = ()) -> Callable[[F], F]:
        needs = tuple(needs)
        unknown = set(needs) - self.allowed_needs
        if unknown:
            allowed = ", ".join(sorted(self.allowed_needs)) or "none"
            raise ValueError(f"{self.kind} '{name}': unknown needs {sorted(unknown)}; allowed: {allowed}")

        def decorate(fn: F) -> F:
            previous = self.get(name)
            if previous is not None and _qualified(previous) != _qualified(fn):
                raise ValueError(
                    f"{self.kind} '{name}' is already registered by {_qualified(previous)}; "
                    f"choose another name for {_qualified(fn)}"
                )
            fn.name = name  # type: ignore[attr-defined]
            fn.needs = needs  # type: ignore[attr-defined]
            self[name] = fn
            return fn

        return decorate

    def __missing__(self, name: str) -> Callable[..., Any]:
        known = ", ".join(sorted(self)) or "none"
        raise UnknownObjectiveError(f"{self.kind} '{name}' is not registered; registered: {known}")


def _qualified(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}:{getattr(fn, '__qualname__', repr(fn))}"


ADVANTAGES = Registry(
    "advantage",
    allowed_needs=(
        "groups",  # group_size=G: rewards are [P*G], each prompt's G completions contiguous
        "token_rewards",  # token_rewards_B_T (reward at the last completion token, minus any in-reward KL)
        "critic",  # values_B_T: the critic's value estimates at completion positions
        "greedy_rollout",  # greedy_rewards_P: reward of each prompt's greedy completion (ReMax)
        "moving_baseline",  # baseline: the loop's running mean of past batch rewards (0-dim tensor)
    ),
)
POLICY_LOSSES = Registry("policy loss", allowed_needs=())
AGGREGATIONS = Registry("loss aggregation", allowed_needs=())
KL_ESTIMATORS = Registry("kl estimator", allowed_needs=())
PREFERENCE_LOSSES = Registry(
    "preference loss",
    allowed_needs=(
        "reference",  # ref_chosen, ref_rejected (or ref_logps for unpaired / listwise)
        "lengths",  # chosen_len, rejected_len: completion token counts (or lengths for unpaired / listwise)
        "unpaired",  # KTO/BCO-style: logps [N] with labels [N] instead of chosen/rejected pairs
        "listwise",  # logps [N, K] with scores [N, K] instead of pairs
        "kl_reference_point",  # KTO's z0: batch estimate of KL(policy || reference) from mismatched pairs
        "reward_shift",  # BCO's delta / beta: running mean of logps - ref_logps over earlier steps (0-dim)
        "win_rates",  # listwise: win_rates_N_K, each completion's estimated probability of beating an opponent
        "reference_samples",  # online: pairs mix policy and reference samples; chosen/rejected_from_reference [N]
        "mixture_opponents",  # online: win_rates_N_K against samples of the policy/reference geometric mixture
        "whole_batch",  # the loss couples the step's pairs (AOT sorts their margins): one call over the whole step
    ),
)
REWARD_MODEL_LOSSES = Registry("reward-model loss", allowed_needs=("listwise",))

advantage = ADVANTAGES.register
policy_loss = POLICY_LOSSES.register
aggregation = AGGREGATIONS.register
kl_estimator = KL_ESTIMATORS.register
preference_loss = PREFERENCE_LOSSES.register
reward_model_loss = REWARD_MODEL_LOSSES.register

ALL_REGISTRIES: dict[str, Registry] = {
    "advantages": ADVANTAGES,
    "policy_losses": POLICY_LOSSES,
    "aggregations": AGGREGATIONS,
    "kl_estimators": KL_ESTIMATORS,
    "preference_losses": PREFERENCE_LOSSES,
    "reward_model_losses": REWARD_MODEL_LOSSES,
}
