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
import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from posttrain.rewards.base import RewardLoadError

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
    """The object (function or class) that `fn` names, before any args are bound."""
    if fn in BUILTIN_REWARDS:
        return _import_attribute(fn, BUILTIN_REWARDS[fn], builtin=True)
    location, sep, attribute = fn.rpartition(":")
    if not sep or not location or not attribute:
        known = ", ".join(sorted(BUILTIN_REWARDS))
        raise RewardLoadError(
            f"reward '{fn}': not a built-in name, 'package.module:function' or 'path/to/file.py:function'; "
            f"built-ins: {known}"
        )
    if location.endswith(".py") or "/" in location or "\\" in location:
        module = _load_file_module(fn, location, base_dir)
        return _get_attribute(fn, module, attribute)
    return _import_attribute(fn, fn)


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


def _import_attribute(fn: str, dotted: str, *, builtin: bool = False) -> Any:
    module_name, _, attribute = dotted.rpartition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if builtin and err.name == module_name:
            raise RewardLoadError(
                f"built-in reward '{fn}' lives in module {module_name}, which this installation lacks"
            ) from err
        raise RewardLoadError(f"reward '{fn}': cannot import module '{module_name}': {err}") from err
    return _get_attribute(fn, module, attribute)


def _get_attribute(fn: str, module: ModuleType, attribute: str) -> Any:
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            public = sorted(name for name in vars(module) if not name.startswith("_"))
            raise RewardLoadError(
                f"reward '{fn}': {module.__name__} has no attribute '{attribute}'; it defines: "
                f"{', '.join(public) or 'nothing public'}"
            )
        target = getattr(target, part)
    return target


def _load_file_module(fn: str, location: str, base_dir: str | Path | None) -> ModuleType:
    path = _find_file(fn, location, base_dir)
    # One module per file path, reused, so that two rewards from one file share its globals.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"posttrain_user_rewards_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise RewardLoadError(f"reward '{fn}': {path} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[module_name]
        raise RewardLoadError(f"reward '{fn}': importing {path} failed: {type(err).__name__}: {err}") from err
    return module


def _find_file(fn: str, location: str, base_dir: str | Path | None) -> Path:
    candidate = Path(location).expanduser()
    if candidate.is_absolute():
        tried = [candidate]
    else:
        tried = [Path(base_dir) / candidate] if base_dir is not None else []
        tried.append(Path.cwd() / candidate)
    for path in tried:
        if path.is_file():
            return path.resolve()
    looked = ", ".join(str(p) for p in tried)
    raise RewardLoadError(f"reward '{fn}': file '{location}' not found (looked at {looked})")
