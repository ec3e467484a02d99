"""Supervised fine-tuning config (`posttrain sft`)."""

from __future__ import annotations

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
