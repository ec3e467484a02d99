"""Offline preference optimisation config (`posttrain pref`) and reward-model config (`posttrain rm`)."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import model_validator

from posttrain.config.sections import (
    DataSection,
    EvalSection,
    ModelSection,
    RunSection,
    Section,
    TaskSection,
    TrainSection,
)
from posttrain.objectives.registry import PREFERENCE_LOSSES, REWARD_MODEL_LOSSES, Registry


class FeedbackTaskSection(TaskSection):
    kind: Literal["preference"] = "preference"
    """Rows built from the task: a correct answer (chosen) against a plausible wrong one (rejected);
    unpaired and listwise losses get the same pairs as labelled or scored completions."""


class FeedbackDataSection(DataSection):
    task: FeedbackTaskSection | None = None
    """Generate preference rows from a built-in task instead of files."""


class PrefSection(Section):
    loss: str = "dpo"
    """A registered preference loss (`posttrain list preference_losses`), or one a plugin registers."""
    loss_args: dict[str, Any] = {"beta": 0.1}
    """Keyword hyper-parameters of the loss, named as in its paper (e.g. beta)."""
    reference: Literal["precomputed", "on_the_fly", "none"] = "precomputed"
    """Reference log-probs: once over the train set before training, per batch, or none (reference-free losses)."""
    length_normalize: bool = False
    """Divide each completion's summed log-prob by its token count before the loss sees it."""


class RMSection(Section):
    loss: str = "bradley_terry"
    """A registered reward-model loss (`posttrain list reward_model_losses`)."""
    loss_args: dict[str, Any] = {}
    """Keyword hyper-parameters of the loss (bradley_terry: center_coef)."""
    use_margin: bool = True
    """Pass a `margin` column of preference rows to the loss when the rows have one."""


class _OfflineConfig(RunSection):
    model: ModelSection
    """The model to train."""
    data: FeedbackDataSection
    """Training and held-out data (data.train / data.eval files, or data.task)."""
    train: TrainSection = TrainSection()
    """Optimisation."""
    eval: EvalSection = EvalSection()
    """Held-out evaluation."""
    plugins: list[str] = []
    """Python files or modules imported before the run; they register their own losses."""

    def _check_loss(self, key: str, registry: Registry, name: str, args: dict[str, Any]) -> Any:
        self.data.require_train()
        import posttrain.objectives  # noqa: F401  (registers the built-in objectives)

        import_plugins(self.plugins, self.recipe_dir)
        if name not in registry:
            raise ValueError(f"{key}.loss: '{name}' is not registered; registered: {', '.join(sorted(registry))}")
        fn = registry[name]
        keywords = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
        unknown = sorted(set(args) - set(keywords))
        if unknown:
            raise ValueError(f"{key}.loss_args: {unknown} are not hyper-parameters of '{name}'; it takes {keywords}")
        return fn


class PrefConfig(_OfflineConfig):
    """Offline preference optimisation: the DPO family, reference-free, unpaired and listwise losses."""

    pref: PrefSection = PrefSection()
    """The preference loss and where its reference log-probs come from."""
    output_dir: str = "runs/pref"
    """Run directory: checkpoints, metrics.jsonl, tensorboard/, final model."""

    @model_validator(mode="after")
    def _loss_fits(self) -> PrefConfig:
        fn = self._check_loss("pref", PREFERENCE_LOSSES, self.pref.loss, self.pref.loss_args)
        if "reference" in fn.needs and self.pref.reference == "none":
            raise ValueError(
                f"pref.reference: 'none' is incompatible with pref.loss '{self.pref.loss}', which needs a "
                "reference model; use precomputed or on_the_fly, or a reference-free loss (simpo, orpo, cpo)"
            )
        return self


class RMConfig(_OfflineConfig):
    """Reward model: a scalar head trained on preference pairs (or scored lists)."""

    rm: RMSection = RMSection()
    """The reward-model loss."""
    output_dir: str = "runs/rm"
    """Run directory: checkpoints, metrics.jsonl, tensorboard/, final model."""

    @model_validator(mode="after")
    def _loss_fits(self) -> RMConfig:
        self._check_loss("rm", REWARD_MODEL_LOSSES, self.rm.loss, self.rm.loss_args)
        return self


def import_plugins(plugins: list[str], base_dir: str | None) -> None:
    """Import each plugin (a .py file, relative to the working directory or the recipe, or a module)."""
    for plugin in plugins:
        if not plugin.endswith(".py"):
            importlib.import_module(plugin)
            continue
        path = Path(plugin)
        if not path.is_file() and base_dir is not None:
            path = Path(base_dir) / plugin
        if not path.is_file():
            raise ValueError(f"plugins: {plugin} is not a file")
        name = f"posttrain_plugin_{abs(hash(str(path.resolve())))}"
        if name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
