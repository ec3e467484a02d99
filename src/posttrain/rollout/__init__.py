"""Generation engines: P prompts x G samples -> `Rollouts`.

`ENGINES` maps a name to an engine instance; every engine implements `Engine.generate`.
"""

from posttrain.rollout.engine import (
    Engine,
    PaddedRollouts,
    Rollouts,
    SamplingParams,
    SamplingParamsError,
    StopChecker,
)
from posttrain.rollout.hf import HFEngine
from posttrain.rollout.native import NativeEngine

ENGINES: dict[str, Engine] = {"native": NativeEngine(), "hf": HFEngine()}

__all__ = [
    "ENGINES",
    "Engine",
    "HFEngine",
    "NativeEngine",
    "PaddedRollouts",
    "Rollouts",
    "SamplingParams",
    "SamplingParamsError",
    "StopChecker",
]
