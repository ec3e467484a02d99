"""The single-turn environment: the prompt is in the row, the episode ends after the model's answer."""

from typing import Any

from posttrain.envs.base import StepResult


class SingleTurnEnv:
    """Prompt ids taken from `row[key]` as given; done after one model turn, no observation."""

    def __init__(self, key: str = "prompt_ids") -> None:
        self.key = key

    def reset(self, row: dict[str, Any]) -> list[int]:
        """Return `row[key]` as a list of token ids."""
        if self.key not in row:
            raise KeyError(f"SingleTurnEnv: row has no field {self.key!r}; fields: {sorted(row)}")
        return [int(t) for t in row[self.key]]

    def step(self, completion_ids: list[int]) -> StepResult:
        """End the episode."""
        return StepResult(observation_ids=[], done=True)
