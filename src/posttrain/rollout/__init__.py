"""Generation engines: P prompts x G samples -> `Rollouts`.

`ENGINES` maps a name to an engine instance, built on first use; every engine implements `Engine.generate`. An
optional engine (`vllm`) is listed without its package: its module is imported only when it is selected.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from posttrain.rollout.engine import (
    Engine,
    PaddedRollouts,
    Rollouts,
    SamplingParams,
    SamplingParamsError,
    StopChecker,
    sync_engine,
)
from posttrain.rollout.hf import HFEngine
from posttrain.rollout.native import NativeEngine


class EngineRegistry(Mapping[str, Engine]):
    """Engines by name. A factory is a class or a `"module:Class"` path imported on first use; `ENGINES[name]` is
    the one shared instance built without arguments, `build(name, args)` a new one with `args` (`rl.engine_args`)."""

    def __init__(self, factories: dict[str, type | str]) -> None:
        self.factories = factories
        self.instances: dict[str, Engine] = {}

    def factory(self, name: str) -> Callable[..., Engine]:
        """The engine's class, its module imported now (the optional package itself only when the class is built)."""
        if name not in self.factories:
            raise KeyError(f"'{name}' is not an engine; engines: {', '.join(sorted(self.factories))}")
        factory = self.factories[name]
        if isinstance(factory, str):
            module, _, attr = factory.partition(":")
            factory = getattr(importlib.import_module(module), attr)
        return factory

    def build(self, name: str, args: Mapping[str, Any] | None = None) -> Engine:
        """The shared instance without `args`, else a new engine built with them."""
        return self.factory(name)(**args) if args else self[name]

    def missing_requirement(self, name: str) -> str | None:
        """What an engine needs that is not installed here (its factory's `missing_requirement`), else None."""
        return getattr(self.factory(name), "missing_requirement", lambda: None)()

    def installed(self) -> list[str]:
        """The engines whose packages are installed here."""
        return [name for name in self.factories if self.missing_requirement(name) is None]

    def __getitem__(self, name: str) -> Engine:
        if name not in self.instances:
            self.instances[name] = self.factory(name)()
        return self.instances[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.factories)

    def __len__(self) -> int:
        return len(self.factories)

    def __contains__(self, name: object) -> bool:
        return name in self.factories


ENGINES = EngineRegistry({"native": NativeEngine, "hf": HFEngine, "vllm": "posttrain.rollout.vllm:VLLMEngine"})


def check_engine(key: str, name: str, args: Mapping[str, Any]) -> None:
    """Config-time check of an engine choice: registered, its package installed, `args` its constructor's keywords."""
    import inspect

    if name not in ENGINES:
        raise ValueError(f"{key}: '{name}' is not an engine; engines: {', '.join(sorted(ENGINES))}")
    missing = ENGINES.missing_requirement(name)
    if missing:
        raise ValueError(f"{key}: '{name}' {missing}")
    allowed = {p for p, v in inspect.signature(ENGINES.factory(name)).parameters.items() if v.kind is v.KEYWORD_ONLY}
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise ValueError(f"{key.rsplit('.', 1)[0]}.engine_args: {unknown} are not arguments of engine '{name}'; "
                         f"allowed: {', '.join(sorted(allowed)) or 'none'}")  # fmt: skip


__all__ = [
    "ENGINES",
    "Engine",
    "EngineRegistry",
    "HFEngine",
    "NativeEngine",
    "PaddedRollouts",
    "Rollouts",
    "SamplingParams",
    "SamplingParamsError",
    "StopChecker",
    "check_engine",
    "sync_engine",
]
