"""Supervised fine-tuning config (`posttrain sft`) and evaluation config (`posttrain eval`)."""

from __future__ import annotations

from posttrain.config.sections import DataSection, EvalSection, LogSection, ModelSection, RunSection, TrainSection


class SFTConfig(RunSection):
    """Supervised fine-tuning: next-token NLL on demonstrations."""

    model: ModelSection = ModelSection()
    """The model to train."""
    data: DataSection = DataSection()
    """Training and held-out data."""
    train: TrainSection = TrainSection()
    """Optimisation."""
    eval: EvalSection = EvalSection()
    """Held-out evaluation (accuracy when rows carry an `answer`)."""
    log: LogSection = LogSection()
    """Experiment trackers (log.to), and the sampled completions online trainers log."""
    output_dir: str = "runs/sft"
    """Run directory: checkpoints, metrics.jsonl, tensorboard/, final model."""


class EvalConfig(RunSection):
    """Greedy accuracy and pass@k of a model on held-out prompts with answers (`posttrain eval`)."""

    model: ModelSection = ModelSection()
    """The model to evaluate."""
    data: DataSection = DataSection()
    """data.eval (a file with prompt and answer) or data.task (its held-out split)."""
    eval: EvalSection = EvalSection()
    """Generation and scoring."""
    output_dir: str = "runs/eval"
    """Where eval.json is written."""
