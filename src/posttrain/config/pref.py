"""Preference optimisation config (`posttrain pref`: offline, or in rounds on the policy's own samples
with an `online` section) and reward-model config (`posttrain rm`)."""

from __future__ import annotations

import inspect
import math
from typing import Annotated, Any, Literal

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator

from posttrain.config.rl import RewardEntry, SamplingSection, import_plugin
from posttrain.config.sections import (
    DataSection,
    EvalSection,
    Fraction,
    LogSection,
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
    unpaired and listwise losses get the same pairs as labelled or scored completions, a stepwise loss (a PRM)
    the worked `<think>` steps, each right or wrong (`tasks/process_data.py`)."""
    rejected: Literal["near_duplicate", "different"] = "near_duplicate"
    """The wrong answer of a pair: a near duplicate, one token or one swap from the right one (`95` -> `96`, `dcba`
    -> `dcab`), or a clearly different one (`95` -> `12`, `dcba` -> `hfgj`)."""
    wrong_step_fraction: Fraction = 0.5
    """Stepwise rows: the share whose worked steps hold a slip (a column's result off by one)."""


class FeedbackDataSection(DataSection):
    task: FeedbackTaskSection | None = None
    """Generate preference rows from a built-in task instead of files."""


class PrefSection(Section):
    loss: str = "dpo"
    """A registered preference loss (`posttrain list preference_losses`), or one a plugin registers."""
    loss_args: dict[str, Any] = {}
    """Keyword hyper-parameters of the loss, named as in its paper (e.g. beta); those left out take the loss's own
    defaults (beta 0.1 for the DPO family, SimPO's 2.0, IPO's tau 0.1, ...; `posttrain list preference_losses`)."""
    reference: Literal["precomputed", "on_the_fly", "none"] = "precomputed"
    """Reference log-probs: once over the train set before training, per batch, or none (reference-free losses)."""
    length_normalize: bool = False
    """Divide each completion's summed log-prob by its token count before the loss sees it."""
    max_prompt_length: PositiveInt | None = None
    """Keep a prompt's last this many tokens (TRL's max_prompt_length; the start is cut, so the end that the
    completion follows survives), counted as truncated; data.max_length still bounds prompt + completion. Online
    rounds sample from prompts cut the same way. null: prompts are kept whole."""


class JudgeSection(Section):
    fn: str
    """A pairwise judge, `package.module:function` or `path/to/file.py:function`, called as
    fn(prompts, completions_a, completions_b, **columns) -> P(a preferred to b) per row
    (`posttrain.rewards.judges:closer_answer` is a built-in one for numeric answers)."""
    args: dict[str, Any] = {}
    """Keyword arguments bound to the judge."""
    timeout_s: PositiveFloat | None = 600.0
    """Time limit of one round's judge call (every comparison of the round at once); a call that runs longer
    stops the run with an error naming the judge, as a call that raises does. null: no limit."""


SELECTIONS = {
    "preference": ("best_vs_worst", "all_pairs", "rso"),
    "unpaired": ("threshold", "top_k"),
    "listwise": ("all",),
}
"""Which `online.select` values build examples of each data kind (the first is the default)."""


class OnlineSection(Section):
    """Rounds on the policy's own samples: sample, score, select, train. train.max_steps optimiser steps
    make train.max_steps / steps_per_round rounds."""

    steps_per_round: PositiveInt = 1
    """Optimiser steps on each round's examples (online DPO: 1; iterative DPO, SPPO, RAFT: many)."""
    prompts_per_round: PositiveInt = 16
    """Prompts drawn from data.train each round (P)."""
    samples_per_prompt: PositiveInt = 2
    """Completions the policy samples per prompt (N); losses with opponents sample N of theirs too."""
    sampling: SamplingSection = SamplingSection()
    """How completions are sampled."""
    engine: str = "native"
    """Generation engine (`posttrain list engines`)."""
    rewards: list[RewardEntry] = []
    """Scalar rewards summed into each completion's score (the `rewards:` format of `posttrain rl`)."""
    judge: JudgeSection | None = None
    """A pairwise judge instead of rewards: scores become win rates from the judge's preferences."""
    max_failure_fraction: Fraction = 0.5
    """Stop when more than this share of one reward call's samples fail."""
    select: Literal["best_vs_worst", "all_pairs", "rso", "threshold", "top_k", "all"] | None = None
    """How scored samples become examples. Pairs: best_vs_worst, all_pairs (above `margin`), rso (RSO's statistical
    rejection sampling, then random pairs); unpaired
    labels: threshold (score >= label_threshold), top_k (RAFT); listwise: all. null: the first for the
    loss's data kind."""
    margin: NonNegativeFloat = 0.0
    """A pair needs chosen score - rejected score > margin (reward units, or win rate under a judge)."""
    label_threshold: float = 1.0
    """select: threshold: a completion scoring at least this is desirable (1.0: a verifier's correct)."""
    top_k: PositiveInt = 1
    """select: top_k: the k best completions of each prompt are trained on."""
    min_score: float | None = None
    """select: top_k: a selected completion scoring below this is left out (rejection sampling)."""
    rejection_beta: PositiveFloat = 0.5
    """select: rso: the beta of the optimal policy pi ~ pi_sample exp(r / beta) the accepted samples follow (RSO,
    arXiv:2309.06657): smaller accepts fewer low-reward samples."""
    rejection_accepted: Annotated[int, Field(ge=2)] = 2
    """select: rso: samples accepted per prompt (paired two by two, so rejection_accepted / 2 pairs at most)."""
    reference: Literal["keep", "refresh"] = "keep"
    """keep: the initial model throughout; refresh: a frozen copy of the policy at the start of each round
    (the previous iterate of iterative DPO, SPPO and DNO)."""
    mixture_coef: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    """Losses that need mixture_opponents: opponents sample from pi^(1-m) * ref^m, token by token (m)."""

    @model_validator(mode="after")
    def _one_feedback(self) -> OnlineSection:
        if bool(self.rewards) == (self.judge is not None):
            raise ValueError(
                "online: give exactly one of rewards (a list, e.g. [{fn: numeric_match}]) and judge "
                "(a pairwise judge, e.g. {fn: posttrain.rewards.judges:closer_answer})"
            )
        from posttrain.rollout import check_engine

        check_engine("online.engine", self.engine, {})
        return self


class RMSection(Section):
    loss: str = "bradley_terry"
    """A registered reward-model loss (`posttrain list reward_model_losses`); a stepwise one (process_bce) trains a
    process reward model on rows of steps and labels, a token classifier."""
    loss_args: dict[str, Any] = {}
    """Keyword hyper-parameters of the loss (bradley_terry: center_coef, label_smoothing)."""
    use_margin: bool = True
    """Pass a `margin` column of preference rows to the loss when the rows have one."""
    step_separator: str = "\n"
    """Stepwise rows: the text after each step, where its label is read (TRL's step_separator; the arithmetic
    task's worked steps: ";")."""
    train_on_last_step_only: bool = False
    """Stepwise rows: train on each row's last label only (TRL's option); held-out rows keep every label."""
    margin_models: list[str] = []
    """Reward-model directories (an ensemble: the same data, other seeds) whose mean preference strength on each
    training pair is its margin (the adaptive margin of Secrets of RLHF II, arXiv:2401.06080); it replaces a margin
    column. They must share the run's tokenizer."""
    margin_scale: PositiveFloat = 1.0
    """The margin is margin_scale times the ensemble's mean preference strength."""


class _OfflineConfig(RunSection):
    model: ModelSection = ModelSection()
    """The model to train."""
    data: FeedbackDataSection = FeedbackDataSection()
    """Training and held-out data (data.train / data.eval files, or data.task)."""
    train: TrainSection = TrainSection()
    """Optimisation."""
    eval: EvalSection = EvalSection()
    """Held-out evaluation."""
    log: LogSection = LogSection()
    """Experiment trackers (log.to), and the sampled completions online trainers log."""
    plugins: list[str] = []
    """Python files or modules imported before the run; they register their own losses."""

    def _check_loss(self, key: str, registry: Registry, name: str, args: dict[str, Any]) -> Any:
        import posttrain.objectives  # noqa: F401  (registers the built-in objectives)

        import_plugins(self.plugins, self.recipe_dir)
        if name not in registry:
            raise ValueError(f"{key}.loss: '{name}' is not registered; registered: {', '.join(sorted(registry))}")
        fn = registry[name]
        keywords = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
        unknown = sorted(set(args) - set(keywords))
        if unknown:
            raise ValueError(f"{key}.loss_args: {unknown} are not hyper-parameters of '{name}'; it takes {keywords}")
        beta = args.get("beta", 1.0)
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 < beta < math.inf:
            raise ValueError(
                f"{key}.loss_args.beta: {beta!r}; beta scales the loss's log-ratios (an inverse temperature) "
                "and must be a number > 0"
            )
        return fn


class PrefConfig(_OfflineConfig):
    """Offline preference optimisation: the DPO family, reference-free, unpaired and listwise losses."""

    pref: PrefSection = PrefSection()
    """The preference loss and where its reference log-probs come from."""
    online: OnlineSection | None = None
    """Train in rounds on the policy's own samples (online / iterative DPO, RAFT, SPPO, XPO, Nash-MD, DNO);
    null: offline, on data.train's preference rows."""
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
        if "reference" not in fn.needs and "reference" in self.pref.model_fields_set and self.pref.reference != "none":
            raise ValueError(
                f"pref.reference: '{self.pref.reference}' is incompatible with pref.loss '{self.pref.loss}', which "
                "is reference-free (no reference model is built); set pref.reference to none or leave it out"
            )
        micro_batch = self.train.micro_batch_size
        if "whole_batch" in fn.needs and micro_batch is not None and micro_batch < self.train.batch_size:
            raise ValueError(
                f"train.micro_batch_size: {micro_batch} splits the step, but pref.loss '{self.pref.loss}' couples "
                f"the step's pairs (its value depends on which pairs share a call), so micro-batches would change "
                f"the update; leave it unset or set it to train.batch_size ({self.train.batch_size})"
            )
        if self.online is None and fn.opponents:
            raise ValueError(
                f"pref.loss: '{self.pref.loss}' trains against opponents sampled from the {fn.opponents} while "
                "training; add an online section (e.g. online: {rewards: [{fn: numeric_match}]})"
            )
        if self.online is not None:
            self._online_fits(fn)
        return self

    def _online_fits(self, fn: Any) -> None:
        online, kind = self.online, feedback_kind(fn)
        if self.train.epochs is None and self.train.max_steps % online.steps_per_round:
            raise ValueError(
                f"train.max_steps={self.train.max_steps} is not a multiple of online.steps_per_round="
                f"{online.steps_per_round} (a round trains steps_per_round steps)"
            )
        allowed = SELECTIONS[kind]
        if online.select is not None and online.select not in allowed:
            raise ValueError(
                f"online.select: '{online.select}' does not build {kind} examples for pref.loss "
                f"'{self.pref.loss}'; use {' or '.join(allowed)}"
            )
        if online.samples_per_prompt < 2 and (kind != "unpaired" or online.judge is not None) and not fn.opponents:
            raise ValueError(
                f"online.samples_per_prompt: pref.loss '{self.pref.loss}' (or a judge) compares a prompt's "
                "samples with each other, so it needs at least 2"
            )


class RMConfig(_OfflineConfig):
    """Reward model: a scalar head trained on preference pairs (or scored lists)."""

    rm: RMSection = RMSection()
    """The reward-model loss."""
    output_dir: str = "runs/rm"
    """Run directory: checkpoints, metrics.jsonl, tensorboard/, final model."""

    @model_validator(mode="after")
    def _loss_fits(self) -> RMConfig:
        fn = self._check_loss("rm", REWARD_MODEL_LOSSES, self.rm.loss, self.rm.loss_args)
        if self.rm.margin_models and "margin" not in fn.needs:
            raise ValueError(f"rm.margin_models: rm.loss '{self.rm.loss}' takes no margin; use bradley_terry, or leave "
                             "margin_models out")  # fmt: skip
        return self


def import_plugins(plugins: list[str], base_dir: str | None) -> None:
    """Import each plugin (a .py file, relative to the recipe or the working directory, or a module)."""
    for plugin in plugins:
        import_plugin(plugin, base_dir)


DATA_KINDS: dict[str | None, Literal["preference", "unpaired", "listwise", "stepwise"]] = {
    "pairs": "preference", "unpaired": "unpaired", "lists": "listwise", "steps": "stepwise", None: "preference",
}  # fmt: skip


def feedback_kind(fn: Any) -> Literal["preference", "unpaired", "listwise", "stepwise"]:
    """The rows an objective trains on (preference pairs, unpaired labelled completions, scored lists), from what
    its inputs say it consumes (`objectives.registry`)."""
    return DATA_KINDS[fn.consumes]
