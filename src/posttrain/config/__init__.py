"""Typed, validated configs; YAML recipes; dotted overrides on the command line."""

from posttrain.config.loading import ConfigError, describe_options, load_config, validate
from posttrain.config.pref import PrefConfig, RMConfig
from posttrain.config.rl import RLConfig
from posttrain.config.sections import (
    DataSection,
    EvalSection,
    LogSection,
    LoraSection,
    ModelSection,
    RunSection,
    TaskSection,
    TrainSection,
)
from posttrain.config.sft import EvalConfig, SFTConfig

__all__ = [
    "ConfigError",
    "DataSection",
    "EvalConfig",
    "EvalSection",
    "LogSection",
    "LoraSection",
    "ModelSection",
    "PrefConfig",
    "RLConfig",
    "RMConfig",
    "RunSection",
    "SFTConfig",
    "TaskSection",
    "TrainSection",
    "describe_options",
    "load_config",
    "validate",
]
