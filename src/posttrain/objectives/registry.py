"""Registries of pure objective functions, the table of inputs the training loops supply, and the decorators.

Every objective is a plain function of tensors registered under a name. Its positional parameters are its
inputs, each named in its registry's supply table (`Registry.inputs`: parameter name -> the need that makes a
loop supply it, None for what every loop supplies); its keyword-only parameters are hyper-parameters, set from
the config (`*_args`), or, where the table names them too, supplied by the loop (`group_size`). What an
objective needs is read from its signature through the table, once, at registration, which refuses a parameter
nothing supplies:

    @advantage("rloo")                       # needs ("groups",): the table supplies group_size for it
    def rloo(rewards_PG, *, group_size): ...

Preference losses say what data they consume (pairs, unpaired, lists: `consumes`), which follows from their
inputs too, and how an online round picks their opponents (`opponents`: "reference" for XPO's reference samples,
"mixture" for Nash-MD's). Loops look objectives up by the name in the config and hand over what the table says;
they never compare an objective's name to a string. A user registers their own objective with the same decorator
from their own file, through the same check; built-ins have no privileges a user function lacks.

This module imports nothing else of posttrain (DESIGN.md: `objectives/` is the bottom of the stack).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

FLAGS = ("whole_batch", "on_policy")
"""Needs that are properties of an objective rather than inputs: `whole_batch`, a loss coupling the step's
pairs (AOT sorts their margins), is called once over the whole step; `on_policy`, a loss whose estimate holds
only on the trained model's own samples (a distillation loss read at the sampled tokens), has the loop sample from
the model for every step."""
OPPONENTS = {"reference": "reference_samples", "mixture": "mixture_opponents"}
"""How an online round samples a loss's opponents, and the need that names it."""


class UnknownObjectiveError(LookupError):
    """A name that no objective was registered under."""

    def __str__(self) -> str:  # LookupError would quote the message
        return str(self.args[0])


class ObjectiveSignatureError(TypeError):
    """An objective whose signature the supply table cannot serve (checked at registration)."""


class Registry(dict[str, Callable[..., Any]]):
    """Name -> function. `inputs`: the supply table, parameter name -> the need that supplies it (None: always).
    Each registered function gets `name`, `needs`, `inputs` (its supplied parameters), and for preference losses
    `consumes` and `opponents`."""

    def __init__(self, kind: str, inputs: Mapping[str, str | None], consumes: Mapping[str, str] | None = None):
        super().__init__()
        self.kind = kind
        self.inputs = dict(inputs)
        self.consumes = dict(consumes or {})
        """Input name -> the data kind an objective with that input consumes (preference: pairs, unpaired, lists)."""

    @property
    def allowed_needs(self) -> frozenset[str]:
        """Every need a registered objective may declare (not an objective: the registry's own check, no paper)."""
        return frozenset(n for n in self.inputs.values() if n) | frozenset(FLAGS) | frozenset(OPPONENTS.values())

    def register(
        self,
        name: str,
        *,
        needs: Iterable[str] = (),
        whole_batch: bool = False,
        on_policy: bool = False,
        opponents: str | None = None,
    ) -> Callable[[F], F]:
        """Register under `name`. `needs` is read from the signature; a `needs` given anyway (the earlier form) must
        be exactly what the signature implies, plus the flags. `whole_batch`, `on_policy` (`FLAGS`), `opponents`:
        see the module."""
        if opponents is not None and opponents not in OPPONENTS:
            raise ValueError(f"{self.kind} '{name}': opponents={opponents!r}; allowed: {', '.join(OPPONENTS)}")

        def decorate(fn: F) -> F:
            previous = self.get(name)
            if previous is not None and _qualified(previous) != _qualified(fn):
                raise ValueError(
                    f"{self.kind} '{name}' is already registered by {_qualified(previous)}; "
                    f"choose another name for {_qualified(fn)}"
                )
            supplied = self._supplied_parameters(name, fn)
            derived = sorted({self.inputs[p] for p in supplied if self.inputs[p]})
            flags = ["whole_batch"] if whole_batch else []
            flags += ["on_policy"] if on_policy else []
            flags += [OPPONENTS[opponents]] if opponents and OPPONENTS[opponents] not in derived else []
            self._check_declared(name, tuple(needs), derived, flags)
            fn.name = name  # type: ignore[attr-defined]
            fn.needs = tuple(derived + flags)  # type: ignore[attr-defined]
            fn.inputs = supplied  # type: ignore[attr-defined]
            kinds = {self.consumes[p] for p in supplied if p in self.consumes}
            fn.consumes = kinds.pop() if len(kinds) == 1 else None  # type: ignore[attr-defined]
            fn.opponents = opponents or ("reference" if "reference_samples" in derived else None)  # type: ignore[attr-defined]
            self[name] = fn
            return fn

        return decorate

    def _supplied_parameters(self, name: str, fn: Callable[..., Any]) -> tuple[str, ...]:
        """The parameters the table supplies; every other must be a keyword-only hyper-parameter."""
        supplied = []
        for p in inspect.signature(fn).parameters.values():
            if p.name in self.inputs:
                supplied.append(p.name)
            elif p.kind is not p.KEYWORD_ONLY:
                known = ", ".join(sorted(self.inputs))
                raise ObjectiveSignatureError(
                    f"{self.kind} '{name}': parameter '{p.name}' is not an input a loop supplies ({known}); "
                    "a hyper-parameter must be keyword-only (after *)"
                )
        return tuple(supplied)

    def _check_declared(self, name: str, declared: tuple[str, ...], derived: list[str], flags: list[str]) -> None:
        if not declared:
            return
        unknown = sorted(set(declared) - self.allowed_needs)
        if unknown:
            raise ValueError(f"{self.kind} '{name}': unknown needs {unknown}; allowed: {sorted(self.allowed_needs)}")
        implied = set(derived) | set(flags)
        rest = set(declared) - implied - set(FLAGS) - set(OPPONENTS.values())
        missing = implied - set(declared) - set(flags)
        if rest or missing:
            raise ObjectiveSignatureError(
                f"{self.kind} '{name}': needs={list(declared)} disagrees with its signature, which needs "
                f"{sorted(implied)}; leave `needs` out (it is read from the parameters)"
            )

    def __missing__(self, name: str) -> Callable[..., Any]:
        known = ", ".join(sorted(self)) or "none"
        raise UnknownObjectiveError(f"{self.kind} '{name}' is not registered; registered: {known}")


def call_with(fn: Callable[..., Any], available: Mapping[str, Any], hyper: Mapping[str, Any] | None = None) -> Any:
    """Call an objective with its inputs from `available` and its hyper-parameters from `hyper`.

    This is how every loop calls every objective, so none ever looks at an objective's name. A registered input
    the loop did not supply raises (a loop's bug, never a silent default); so does a hyper-parameter the function
    does not take (configs reject those at load time already). An unregistered helper (`lambda_returns`) gets the
    parameters it names from `hyper`, then `available`.
    """
    hyper = hyper or {}
    parameters = inspect.signature(fn).parameters
    inputs = getattr(fn, "inputs", None)
    unknown = sorted(set(hyper) - set(parameters))
    if inputs is not None and unknown:
        raise TypeError(f"{fn.name}: {unknown} are not parameters of it")
    kwargs = {}
    for name, p in parameters.items():
        if name in hyper:
            kwargs[name] = hyper[name]
        elif name in available:
            kwargs[name] = available[name]
        elif inputs is not None and name in inputs and p.default is p.empty:
            raise TypeError(f"{fn.name}: the loop supplied no '{name}' (needs {fn.needs})")
    return fn(**kwargs)


def _qualified(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}:{getattr(fn, '__qualname__', repr(fn))}"


ADVANTAGES = Registry(
    "advantage",
    inputs={
        "rewards_PG": None,  # [P*G] sequence rewards (minus coef * summed KL when the KL is in the reward)
        "mask_B_T": None,  # [B, T] the tokens the model generated
        "group_size": "groups",  # G: each prompt's G completions are contiguous
        "token_rewards_B_T": "token_rewards",  # the reward at the last completion token, minus any in-reward KL
        "values_B_T": "critic",  # the critic's value estimates at completion positions
        "greedy_rewards_P": "greedy_rollout",  # the reward of each prompt's greedy completion (ReMax)
        "baseline": "moving_baseline",  # the loop's running mean of past batch rewards (0-dim)
        "turn_ids_B_T": "turns",  # [B, T] int64 the model turn of each generated token, -1 elsewhere
        "process_rewards_B_T": "process_rewards",  # [B, T] a process reward model's rewards, kept apart from the
        # outcome (without this need the loop adds them to the token and sequence rewards)
    },
)
POLICY_LOSSES = Registry(
    "policy loss",
    inputs={
        "logp_B_T": None, "old_logp_B_T": None, "adv_B_T": None, "mask_B_T": None,
        "rewards_B": "group_rewards",  # [B] each row's sequence reward as scored (no KL shaping)
        "group_mean_rewards_B": "group_rewards",  # [B] the mean reward of the row's group (NFT's r_q)
    },
)
AGGREGATIONS = Registry(
    "loss aggregation",
    inputs={"loss_B_T": None, "mask_B_T": None, "num_tokens": None, "num_seqs": None, "max_len": None},
)
KL_ESTIMATORS = Registry("kl estimator", inputs={"logp_B_T": None, "ref_logp_B_T": None, "old_logp_B_T": None})
PREFERENCE_LOSSES = Registry(
    "preference loss",
    inputs={
        "chosen": None, "rejected": None,  # pairs: summed completion log-probs [N]
        "logps": "unpaired", "labels": "unpaired",  # KTO/BCO-style: logps [N] with labels [N]
        "logps_N_K": "listwise", "scores_N_K": "listwise",  # lists: [N, K] with scores
        "ref_chosen": "reference", "ref_rejected": "reference", "ref_logps": "reference", "ref_logps_N_K": "reference",
        "chosen_len": "lengths", "rejected_len": "lengths", "lengths": "lengths", "lengths_N_K": "lengths",
        "kl_ref_point": "kl_reference_point",  # KTO's z0: batch estimate of KL(policy || reference), 0-dim
        "reward_shift": "reward_shift",  # BCO's delta / beta: running mean of earlier log-ratios, 0-dim
        "win_rates_N_K": "win_rates",  # each completion's estimated probability of beating an opponent
        "chosen_from_reference": "reference_samples", "rejected_from_reference": "reference_samples",  # online XPO
    },
    consumes={"chosen": "pairs", "rejected": "pairs", "logps": "unpaired", "labels": "unpaired",
              "logps_N_K": "lists", "scores_N_K": "lists"},
)
REWARD_MODEL_LOSSES = Registry(
    "reward-model loss",
    inputs={"chosen_rewards": None, "rejected_rewards": None, "rewards_N_K": "listwise", "scores_N_K": "listwise",
            "margin": "margin",
            "step_logits_S": "stepwise", "step_labels_S": "stepwise"},  # [S] a PRM's logit and label at each step
    consumes={"chosen_rewards": "pairs", "rewards_N_K": "lists", "step_logits_S": "steps"},
)
DISTILLATION_LOSSES = Registry(
    "distillation loss",
    inputs={
        # whole next-token distributions, as the hidden states and heads that give them (never [N, V] logits)
        "student_hidden_N_H": "distributions", "student_head_V_H": "distributions", "student_bias_V": "distributions",
        "teacher_hidden_N_H": "distributions", "teacher_head_V_H": "distributions", "teacher_bias_V": "distributions",
        # the log-probs of the tokens in the sequence under each model [N]
        "logp_N": None, "teacher_logp_N": "token_logprobs",
    },
)

advantage = ADVANTAGES.register
policy_loss = POLICY_LOSSES.register
aggregation = AGGREGATIONS.register
kl_estimator = KL_ESTIMATORS.register
preference_loss = PREFERENCE_LOSSES.register
reward_model_loss = REWARD_MODEL_LOSSES.register
distillation_loss = DISTILLATION_LOSSES.register

ALL_REGISTRIES: dict[str, Registry] = {
    "advantages": ADVANTAGES,
    "policy_losses": POLICY_LOSSES,
    "aggregations": AGGREGATIONS,
    "kl_estimators": KL_ESTIMATORS,
    "preference_losses": PREFERENCE_LOSSES,
    "reward_model_losses": REWARD_MODEL_LOSSES,
    "distillation_losses": DISTILLATION_LOSSES,
}
