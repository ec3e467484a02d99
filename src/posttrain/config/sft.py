"""Supervised fine-tuning config (`posttrain sft`) and evaluation config (`posttrain eval`)."""

from __future__ import annotations

from pydantic import model_validator

from posttrain.config.sections import DataSection, EvalSection, ModelSection, RunSection, TrainSection


class SFTConfig(RunSection):
    """Supervised fine-tuning: next-token NLL on demonstrations."""

    model: ModelSection
    """The model to train."""
    data: DataSection
    """Training and held-out data."""
    train: TrainSection = TrainSection()
    """Optimisation."""
    eval: EvalSection = EvalSection()
    """Held-out evaluation (accuracy when rows carry an `answer`)."""
    output_dir: str = "runs/sft"
    """Run directory: checkpoints, metrics.jsonl, tensorboard/, final model."""

    @model_validator(mode="after")
    def _has_train_data(self) -> SFTConfig:
        self.data.require_train()
        return self


class EvalConfig(RunSection):
    """Greedy accuracy and pass@k of a model on held-out prompts with answers (`posttrain eval`)."""

    model: ModelSection
    """The model to evaluate."""
    data: DataSection
    """data.eval (a file with prompt and answer) or data.task (its held-out split)."""
    eval: EvalSection = EvalSection()
    """Generation and scoring."""
    output_dir: str = "runs/eval"
    """Where eval.json is written."""

    @model_validator(mode="after")
    def _has_eval_data(self) -> EvalConfig:
        if self.data.eval is None and self.data.task is None:
            raise ValueError("set data.eval (a file with prompt and answer) or data.task")
        return self
