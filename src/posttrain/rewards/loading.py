"""Turn a recipe's `fn:` string and `args:` into a reward callable.

`fn` is one of:
- a built-in name (`BUILTIN_REWARDS`),
- `package.module:function` (anything importable),
- `path/to/file.py:function` (relative to `base_dir`, the recipe's directory, then to the working dir).

What `fn` names is then bound to `args` by one rule, the same for built-ins and user code:
- a class is instantiated once with `args` as keyword arguments, and the instance is the reward (it
  also gets `base_dir=` when its constructor takes that parameter and `args` does not set it);
- a function gets `args` bound as keyword arguments on every call (`functools.partial`).
Each arg must name a parameter the function or constructor spells out: `**kwargs` receives the dataset
columns, so an arg it would swallow is taken for a typo and rejected at load time.

Built-ins are imported only when named, so an optional dependency (math-verify, the code sandbox)
costs nothing until a recipe uses it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from posttrain.rewards.base import RewardLoadError
from posttrain.runtime.user_code import resolve

BUILTIN_REWARDS: dict[str, str] = {
    "exact_match": "posttrain.rewards.verifiers:exact_match",
    "numeric_match": "posttrain.rewards.verifiers:numeric_match",
    "math_verify": "posttrain.rewards.verifiers:MathVerifyReward",
    "format": "posttrain.rewards.format:FormatReward",
    "length_penalty": "posttrain.rewards.length:length_penalty",
    "overlong_penalty": "posttrain.rewards.length:OverlongPenalty",
    "reward_model": "posttrain.rewards.reward_model:RewardModelScorer",
    "ensemble": "posttrain.rewards.ensemble:EnsembleReward",
    "code_tests": "posttrain.rewards.code:code_tests_reward",
    "tool_efficiency": "posttrain.rewards.tool_use:tool_efficiency",
}
"""Built-in reward name -> `module:attribute`, imported on first use."""


def load_reward_fn(
    fn: str, args: Mapping[str, Any] | None = None, base_dir: str | Path | None = None
) -> Callable[..., Any]:
    """The reward callable that `fn` names, bound to `args` (see the module docstring for the rule)."""
    target = resolve_reward_target(fn, base_dir)
    return bind_reward_args(fn, target, dict(args or {}), base_dir)


def default_reward_name(fn: str) -> str:
    """The name a reward is logged under when its spec gives none: the built-in or function name."""
    if fn in BUILTIN_REWARDS:
        return fn
    return fn.rpartition(":")[2]


def resolve_reward_target(fn: str, base_dir: str | Path | None = None) -> Any:
    """The object (function or class) that `fn` names, before any args are bound (`runtime.user_code`)."""
    where = f"built-in reward '{fn}'" if fn in BUILTIN_REWARDS else f"reward '{fn}'"
    return resolve(fn, base_dir=base_dir, builtins=BUILTIN_REWARDS, where=where, error=RewardLoadError,
                   prefix="posttrain_user_rewards")  # fmt: skip


def bind_reward_args(
    fn: str, target: Any, args: dict[str, Any], base_dir: str | Path | None = None
) -> Callable[..., Any]:
    """Instantiate a class with `args`, or bind `args` to a function's keywords (checked now)."""
    if not callable(target):
        raise RewardLoadError(f"reward '{fn}': {target!r} is not callable (a {type(target).__name__})")
    if inspect.isclass(target):
        return _instantiate(fn, target, args, base_dir)
    if not args:
        return target
    _check_signature_accepts(fn, target, args)
    bound = functools.partial(target, **args)
    # partial objects have no __name__; loggers and error messages use it.
    bound.__name__ = getattr(target, "__name__", default_reward_name(fn))  # type: ignore[attr-defined]
    return bound


def _instantiate(fn: str, cls: type, args: dict[str, Any], base_dir: str | Path | None) -> Any:
    parameters = inspect.signature(cls).parameters
    if "base_dir" in parameters and "base_dir" not in args:
        args = {**args, "base_dir": base_dir}
    _check_signature_accepts(fn, cls, args)
    instance = cls(**args)
    if not callable(instance):
        raise RewardLoadError(f"reward '{fn}': instances of {cls.__qualname__} are not callable (no __call__)")
    return instance


def _check_signature_accepts(fn: str, target: Any, args: dict[str, Any]) -> None:
    # Reward functions take **kwargs (every dataset column reaches every function), so binding alone
    # would swallow a misspelt arg; each arg must name a parameter that is spelt out.
    try:
        parameters = inspect.signature(target).parameters
    except ValueError:  # builtins without an introspectable signature: let the call decide
        return
    named = [
        name
        for name, p in parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    unknown = sorted(set(args) - set(named))
    if unknown:
        raise RewardLoadError(
            f"reward '{fn}': args {unknown} are not parameters of {getattr(target, '__qualname__', target)}; "
            f"its parameters: {', '.join(named) or 'none'}"
        )
