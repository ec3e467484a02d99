"""posttrain: post-training of generative models with feedback.

import posttrain
posttrain.sft("recipes/arith-sft.yaml", overrides=["train.max_steps=50"])
"""

from typing import Any

__version__ = "0.1.0"

_API = ("sft", "rl", "pref", "rm", "evaluate", "generate", "export", "write_task", "registered", "summarise_run",
        "report", "compare")


def __getattr__(name: str) -> Any:
    # The API pulls in torch and transformers; `posttrain --help` and `import posttrain.objectives` should not.
    if name in _API:
        from posttrain import api

        return getattr(api, name)
    raise AttributeError(f"module 'posttrain' has no attribute {name!r}")


__all__ = ["__version__", *_API]
