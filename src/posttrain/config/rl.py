"""Online RL config (`posttrain rl`): sample a group of completions per prompt, score, update.

Objectives are named by their registered names (`posttrain list advantages`); `plugins` are imported
before validation, so an objective a user registers in their own file can be named like a built-in.
"""

from __future__ import annotations

import inspect
from typing import Annotated, Any, Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from posttrain.config.sections import (
    DataSection,
    EvalSection,
    Fraction,
    LogSection,
    ModelSection,
    RunSection,
    Section,
    task_verifier,
)
from posttrain.config.sections import TrainSection as _TrainSection
from posttrain.objectives import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES
from posttrain.objectives.registry import Registry
from posttrain.runtime import user_code


def check_registered(
    key: str, name: str, registry: Registry, args_key: str | None = None, args: dict[str, Any] | None = None
) -> None:
    if name not in registry:
        raise ValueError(
            f"{key}: '{name}' is not a registered {registry.kind}; registered: {', '.join(sorted(registry))}"
        )
    if args:
        params = inspect.signature(registry[name]).parameters
        allowed = {p for p, v in params.items() if v.kind is v.KEYWORD_ONLY} - set(registry.inputs)
        unknown = sorted(set(args) - allowed)
        if unknown:
            raise ValueError(
                f"{args_key}: {unknown} are not arguments of {registry.kind} '{name}'; "
                f"allowed: {', '.join(sorted(allowed)) or 'none'}"
            )


def import_plugin(plugin: str, recipe_dir: str | None = None) -> None:
    """Import a plugin: a `.py` file (relative to the recipe's directory, then the working directory) or a module."""
    user_code.import_plugin(plugin, recipe_dir, error=ValueError)


class SamplingSection(Section):
    temperature: PositiveFloat = 1.0
    """Sampling temperature (> 0: RL needs sampled completions); training log-probs use the same one."""
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    """Nucleus mass; 1.0 is off."""
    top_k: NonNegativeInt = 0
    """Keep the k most likely tokens; 0 is off."""
    min_p: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    """Drop tokens with p < min_p * max p; 0 is off."""
    max_new_tokens: PositiveInt = 16
    """Most tokens per completion; a completion cut here counts as truncated."""
    stop_strings: list[str] = []
    """Generation also ends once the completion contains one of these (the EOS token always ends it)."""


class KLSection(Section):
    estimator: str = "k3"
    """A registered KL estimator (`posttrain list kl_estimators`)."""
    coef: NonNegativeFloat = 0.0
    """beta. 0 turns the KL off and no reference model is built."""
    in_reward: bool = False
    """true: subtract coef * KL_t from the token rewards (PPO, REINFORCE++; use k1); false: add it to the loss."""
    target: PositiveFloat | None = None
    """Adapt coef towards this KL per sequence each step (Ziegler et al. 2019, arXiv:1909.08593); null: fixed."""
    horizon: PositiveFloat = 10000
    """Adaptive KL horizon in samples (Ziegler et al. 2019 use 10000)."""


class ValueSection(Section):
    clip_range: PositiveFloat = 0.2
    """Clipped value loss range (PPO implementations, Baselines ppo2); a large value turns the clip off."""
    coef: NonNegativeFloat = 0.5
    """Weight of the value loss (it trains the critic with its own optimiser; the weight scales its gradient)."""
    lr: PositiveFloat | None = None
    """Critic learning rate; null: train.lr."""


class EnvEntry(Section):
    name: str = "single_turn"
    """A registered environment (`posttrain list environments`), `package.module:Class` or `path/to/file.py:Class`."""
    args: dict[str, Any] = {}
    """Keyword arguments of the environment's constructor (it also gets `tokenizer` and `base_dir` if it takes them)."""


class EnvSection(EnvEntry):
    """Where episodes come from: the environment that plays each prompt (docs/agents.md)."""

    mix: dict[str, dict[str, Any]] = {}
    """Several environments in one batch: key -> {name, args}; a row whose `column` holds a key plays that entry,
    the others play `name`."""
    column: str = "environment"
    """The row column that picks an entry of `mix` (TRL's `environment` field)."""
    max_turns: PositiveInt = 8
    """Most model turns per episode; an episode cut here counts as truncated."""
    max_total_tokens: PositiveInt | None = None
    """Most tokens after the prompt (model and environment tokens, every turn); null: no limit but max_turns."""
    mask_truncated: bool = False
    """Leave truncated episodes (a limit reached before the environment said done) out of the loss; their rewards
    still count in the group baselines (TRL's mask_truncated_completions)."""
    mask_failed: bool = True
    """Leave episodes whose environment raised out of the loss (they are counted either way)."""

    @property
    def entries(self) -> dict[str, EnvEntry]:
        """`mix` as typed entries."""
        return {key: EnvEntry.model_validate(raw) for key, raw in self.mix.items()}

    @model_validator(mode="after")
    def _known(self) -> EnvSection:
        from posttrain.envs.registry import ENVIRONMENTS

        for key, raw in self.mix.items():
            try:
                EnvEntry.model_validate(raw)
            except ValueError as err:
                raise ValueError(f"env.mix.{key}: {err}") from None
        for key, entry in [("env.name", self), *((f"env.mix.{k}.name", e) for k, e in self.entries.items())]:
            if entry.name not in ENVIRONMENTS and ":" not in entry.name:
                raise ValueError(f"{key}: '{entry.name}' is not a registered environment nor 'module:Class' or "
                                 f"'file.py:Class'; registered: {', '.join(sorted(ENVIRONMENTS))}")  # fmt: skip
        return self


class FiltrationSection(Section):
    """PF-PPO's policy filtration (Zhang et al. 2024, arXiv:2409.06957): resample a step's completions with weights
    from their rewards, favouring those whose rewards the reward model gives most reliably."""

    method: Literal["pow", "max_min", "max_random"] = "pow"
    """pow: weight |reward|^weight_pow; max_min: 1 for the step's highest and lowest reward, else 0; max_random: 0.4 for
    the highest, 0.1 for the rest (the authors' three, `compute_pf_ppo_reweight_data`)."""
    weight_pow: PositiveFloat = 2.0
    """The power of method pow (the authors' default 2)."""


class ProcessRewardSection(Section):
    """Per-step rewards from a process reward model at the token where each step ends (`rewards/process.py`;
    Gao et al. 2024, arXiv:2410.15115)."""

    kind: Literal["prm", "implicit"] = "prm"
    """prm: a process reward model's p(step right) per step; implicit: an implicit PRM's summed beta * log pi/ref
    per step (Yuan et al. 2024, arXiv:2412.01981)."""
    path: str
    """prm: the PRM's directory (`posttrain rm` with loss process_bce, a one-label token classifier); implicit: the
    implicit PRM's (`posttrain pref` with loss implicit_prm, a causal LM). It shares the policy's tokenizer."""
    reference: str | None = None
    """implicit: the directory of the model the implicit PRM was trained from (its reference)."""
    beta: PositiveFloat = 0.05
    """implicit: the beta of its token rewards, as it was trained (pref.loss_args.beta; PRIME's 0.05)."""
    step_separator: str = "\n"
    """What ends a step in a sampled completion, as the PRM was trained (rm.step_separator; the arithmetic task's
    worked steps: ";"); a completion's last model token always ends a step."""
    refinement: Literal["clip", "delta", "none"] = "clip"
    """How the PRM's p(step right) becomes a step reward: clip, min(p - eta, 0); delta, p_k - p_{k+1} with the last
    step's 0; none, p itself (unbounded in the number of steps: the reward hacking the paper shows)."""
    eta: float = 0.5
    """Clip's threshold. Not the paper's value (which depends on its PRM): 0.5 is where a PRM trained with
    process_bce calls a step right."""
    coef: PositiveFloat = 1.0
    """Weight of the process rewards beside the outcome rewards (`rewards:`)."""
    batch_size: PositiveInt | None = None
    """Episodes per PRM forward (memory only); null: the whole step."""

    @model_validator(mode="after")
    def _fits_kind(self) -> ProcessRewardSection:
        if self.kind == "implicit" and self.reference is None:
            raise ValueError("rl.process_reward.reference: kind implicit scores log pi/ref; set the directory of the "
                             "model the implicit PRM was trained from")  # fmt: skip
        if self.kind == "implicit" and self.refinement != "none":
            raise ValueError(f"rl.process_reward.refinement: '{self.refinement}' refines a PRM's probabilities; kind "
                             "implicit gives step rewards themselves: set refinement: none")  # fmt: skip
        if self.kind == "prm" and self.reference is not None:
            raise ValueError("rl.process_reward.reference: only kind implicit has a reference")
        return self


class RLSection(Section):
    prompts_per_step: PositiveInt = 8
    """Prompts sampled per optimiser step (P)."""
    group_size: Annotated[int, Field(ge=2)] = 8
    """Completions per prompt (G); group baselines need at least 2."""
    epochs: PositiveInt = 1
    """Passes over each step's rollouts."""
    minibatches: PositiveInt = 1
    """Optimiser updates per pass; 1 with epochs=1 is strictly on-policy."""
    micro_batch_size: PositiveInt | None = None
    """Sequences per forward/backward (memory only; never changes the result). Default: the whole minibatch."""
    engine: str = "native"
    """Generation engine (`posttrain list engines`); `vllm` needs vLLM installed (docs/engines.md)."""
    engine_args: dict[str, Any] = {}
    """Keyword arguments of the engine's constructor (vllm: max_sync_gap, dtype, max_model_len, sleep_level, ...)."""
    sampling: SamplingSection = SamplingSection()
    """How completions are sampled."""
    advantage: str = "grpo"
    """A registered advantage estimator (`posttrain list advantages`)."""
    advantage_args: dict[str, Any] = {}
    """Keyword arguments of the advantage estimator (its keyword-only parameters)."""
    policy_loss: str = "ppo"
    """A registered policy loss (`posttrain list policy_losses`)."""
    policy_loss_args: dict[str, Any] = {}
    """Keyword arguments of the policy loss."""
    loss_aggregation: str = "token_mean"
    """A registered loss aggregation (`posttrain list aggregations`)."""
    kl: KLSection = KLSection()
    """KL to the initial policy (the reference)."""
    entropy_coef: NonNegativeFloat = 0.0
    """Entropy bonus weight (PPO, arXiv:1707.06347, Eq. 9); 0 disables it."""
    value: ValueSection = ValueSection()
    """The critic, used only when the advantage needs one."""
    dynamic_sampling: bool = False
    """DAPO (arXiv:2503.14476): drop groups whose rewards are all equal and sample more prompts."""
    dynamic_sampling_max_batches: PositiveInt = 3
    """Most generation rounds per step under dynamic sampling; then the step trains on what it has."""
    max_prompt_length: PositiveInt | None = None
    """Keep a prompt's last this many tokens; null: data.max_length."""
    process_reward: ProcessRewardSection | None = None
    """Per-step rewards from a process reward model, delivered to each step's last token; null: none."""
    filtration: FiltrationSection | None = None
    """PF-PPO (arXiv:2409.06957): train each step on its completions resampled by reward (with replacement, as many
    as were sampled); null trains on every completion once."""

    @model_validator(mode="after")
    def _registered(self) -> RLSection:
        check_registered("rl.advantage", self.advantage, ADVANTAGES, "rl.advantage_args", self.advantage_args)
        check_registered(
            "rl.policy_loss", self.policy_loss, POLICY_LOSSES, "rl.policy_loss_args", self.policy_loss_args
        )
        check_registered("rl.loss_aggregation", self.loss_aggregation, AGGREGATIONS)
        check_registered("rl.kl.estimator", self.kl.estimator, KL_ESTIMATORS)
        if "process_rewards" in ADVANTAGES[self.advantage].needs and self.process_reward is None:
            raise ValueError(f"rl.advantage: '{self.advantage}' needs process rewards; set rl.process_reward (a PRM "
                             "directory) or choose another advantage")  # fmt: skip
        if self.kl.coef == 0 and (self.kl.in_reward or self.kl.target is not None):
            raise ValueError(
                "rl.kl: in_reward or target is set but coef is 0, so there is no KL term and no reference; "
                "set rl.kl.coef > 0 (e.g. 0.05) or drop in_reward/target"
            )
        from posttrain.rollout import check_engine

        check_engine("rl.engine", self.engine, self.engine_args)
        return self


class RewardEntry(Section):
    fn: str = "numeric_match"
    """A built-in reward name, `package.module:function` or `path/to/file.py:function`."""
    weight: float = 1.0
    """Multiplies this reward's scores in the total."""
    args: dict[str, Any] = {}
    """Keyword arguments bound to the function (or given to a class's constructor)."""
    timeout_s: PositiveFloat | None = 30.0
    """Seconds one call may take before its samples score failure_score; null waits forever."""
    failure_score: float = 0.0
    """Score of a sample whose reward raised, timed out or returned a non-number."""
    name: str | None = None
    """Name in metrics; default: the function's name."""


class RLTrainSection(_TrainSection):
    lr: PositiveFloat = 1e-5
    """Peak learning rate (AdamW)."""
    warmup_steps: NonNegativeInt = 0
    """Linear warm-up steps."""
    schedule: Literal["cosine", "linear", "constant"] = "constant"
    """Decay after warm-up: cosine, linear or constant."""


class RLConfig(RunSection):
    """Online RL from verifiable or learned rewards (PPO / GRPO family)."""

    model: ModelSection = ModelSection()
    """The policy to train (and, frozen, the reference when a KL term is used)."""
    data: DataSection = DataSection()
    """Prompt rows (`prompt` plus columns such as `answer`), or data.task."""
    train: RLTrainSection = RLTrainSection()
    """Optimisation (train.batch_size is unused: a step is rl.prompts_per_step x rl.group_size)."""
    eval: EvalSection = EvalSection()
    """Held-out greedy accuracy at eval_every and at the end."""
    log: LogSection = LogSection()
    """Experiment trackers (log.to), and the sampled completions online trainers log."""
    rl: RLSection = RLSection()
    """Sampling, advantage, policy loss, KL, critic."""
    env: EnvSection = EnvSection()
    """The environment each prompt's episodes are played in (single-turn by default; docs/agents.md)."""
    rewards: list[RewardEntry] = [RewardEntry()]
    """Weighted rewards summed into the total. Left out beside data.task, the task's verifier (numeric_match, or
    exact_match for reverse and sort)."""
    max_failure_fraction: Fraction = 0.5
    """Stop when more than this share of one reward call's samples fail."""
    plugins: list[str] = []
    """Python files or modules imported before validation (to register your own objectives)."""
    output_dir: str = "runs/rl"
    """Run directory: checkpoints, metrics.jsonl, tensorboard/, final model."""

    @model_validator(mode="before")
    @classmethod
    def _import_plugins(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            for plugin in raw.get("plugins") or []:
                import_plugin(str(plugin), raw.get("recipe_dir"))
        return raw

    @model_validator(mode="before")
    @classmethod
    def _task_verifier_rewards_by_default(cls, raw: Any) -> Any:
        verifier = task_verifier(raw)
        return {**raw, "rewards": [{"fn": verifier}]} if verifier is not None and "rewards" not in raw else raw

    @model_validator(mode="after")
    def _checks(self) -> RLConfig:
        if not self.rewards:
            raise ValueError("rewards: empty; give at least one reward (e.g. [{fn: numeric_match}])")
        return self
