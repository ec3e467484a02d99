"""Environments by name, or from a user's `path/to/file.py:Class` or `package.module:Class`, and a step's mix of them.

    env: {name: calculator, args: {max_tool_calls: 2}}            # a recipe's env section
    env: {name: single_turn, mix: {game: {name: guess_number}}, column: environment}

An environment is a class (or any callable returning one) constructed once per episode with `args` as keyword
arguments; a constructor that takes `tokenizer` gets the run's tokenizer, one that takes `base_dir` the recipe's
directory (for relative paths), unless `args` sets them. Built-ins are imported only when named. With `mix`, each
row's `column` names the entry of `mix` that plays it; a row without the column plays `name` (single-turn by
default), so several environments share one batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.envs.base import Environment
from posttrain.runtime.user_code import resolve

ENVIRONMENTS: dict[str, str] = {
    "single_turn": "posttrain.envs.single_turn:SingleTurnEnv",
    "tools": "posttrain.envs.tool_env:ToolEnv",
    "calculator": "posttrain.envs.tool_env:CalculatorEnv",
    "python": "posttrain.envs.tool_env:PythonEnv",
    "search": "posttrain.envs.tool_env:SearchEnv",
    "guess_number": "posttrain.envs.games:GuessNumberEnv",
    "openai_agent": "posttrain.agents.env:AgentEnv",
}
"""Built-in environment name -> `module:Class`, imported on first use."""


class EnvironmentLoadError(ValueError):
    """An environment name, file or class that cannot be used; the message says which and what is allowed."""


EnvironmentFactory = Callable[[], Environment]


def resolve_environment(name: str, base_dir: str | Path | None = None) -> Any:
    """The class (or factory) that `name` names: a built-in, `package.module:Class` or `path/file.py:Class`."""
    return resolve(name, base_dir=base_dir, builtins=ENVIRONMENTS, where=f"env '{name}'", error=EnvironmentLoadError,
                   prefix="posttrain_user_envs")  # fmt: skip


def environment_factory(
    name: str, args: Mapping[str, Any] | None = None, *, tokenizer: Any = None, base_dir: str | Path | None = None
) -> EnvironmentFactory:
    """A zero-argument factory of fresh environments of `name`, its constructor's arguments checked now."""
    target = resolve_environment(name, base_dir)
    if not callable(target):
        raise EnvironmentLoadError(f"env '{name}': {target!r} is not a class or callable")
    bound = dict(args or {})
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        parameters = {}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    for key, value in (("tokenizer", tokenizer), ("base_dir", base_dir)):
        if key in parameters and key not in bound:
            bound[key] = value
    unknown = sorted(set(bound) - set(parameters)) if parameters and not takes_any else []
    if unknown:
        named = ", ".join(p for p in parameters if p not in ("tokenizer", "base_dir")) or "none"
        raise EnvironmentLoadError(f"env '{name}': args {unknown} are not parameters of it; its parameters: {named}")

    def make() -> Environment:
        return target(**bound)

    make()  # a constructor that fails on its args fails here, at load time, naming the environment
    return make


@dataclass
class EnvironmentMix:
    """Which environment plays each row: `factories[row[column]]`, else `default`."""

    default: EnvironmentFactory
    factories: dict[str, EnvironmentFactory] = field(default_factory=dict)
    column: str = "environment"

    def make(self, row: Mapping[str, Any]) -> Environment:
        key = row.get(self.column) if self.factories else None
        if key is None:
            return self.default()
        if key not in self.factories:
            raise EnvironmentLoadError(
                f"row column {self.column!r} is {key!r}, which is not an entry of env.mix; "
                f"entries: {', '.join(sorted(self.factories))}"
            )
        return self.factories[key]()

    @property
    def single_turn(self) -> bool:
        from posttrain.envs.single_turn import SingleTurnEnv

        return not self.factories and self.default is SingleTurnEnv


def build_environments(section: Any, *, tokenizer: Any, base_dir: str | Path | None) -> EnvironmentMix:
    """The mix a config's `env` section names (`config.rl.EnvSection`)."""
    from posttrain.envs.single_turn import SingleTurnEnv

    def factory(name: str, args: Mapping[str, Any]) -> EnvironmentFactory:
        if name == "single_turn" and not args:
            return SingleTurnEnv
        return environment_factory(name, args, tokenizer=tokenizer, base_dir=base_dir)

    mix = {key: factory(entry.name, entry.args) for key, entry in section.entries.items()}
    return EnvironmentMix(factory(section.name, section.args), mix, section.column)
