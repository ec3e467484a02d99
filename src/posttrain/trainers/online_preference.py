"""Online and iterative preference optimisation (`posttrain pref` with an `online` section): rounds on the
policy's own samples.

A round draws `online.prompts_per_round` prompts (P), samples `online.samples_per_prompt` (N) completions
of each from the current policy (and N from an opponent when the loss needs one: the reference for XPO,
the policy/reference geometric mixture for Nash-MD), scores them with the rewards or a pairwise judge,
turns the scores into the examples the loss consumes (pairs, labelled completions or lists;
`objectives/pairing.py`), computes their reference log-probs once, and trains `online.steps_per_round`
optimiser steps of `train.batch_size` examples on them. The reference is the initial model (`keep`) or a
frozen copy of the policy at the start of each round (`refresh`). One step per round on two samples per
prompt is online DPO (Guo et al. 2024, arXiv:2402.04792); many steps per round is iterative DPO (Xiong et
al. 2023, arXiv:2312.11456; Dong et al. 2024, arXiv:2405.07863); the loss decides the rest (`nll` with
top-k selection is RAFT, Dong et al. 2023, arXiv:2304.06767; `sppo` is SPPO, arXiv:2405.00675; `xpo` XPO,
arXiv:2405.21046; `nash_md` Nash-MD, arXiv:2312.00886; `dpo` with a judge is DNO, arXiv:2404.03715).
Checkpoints and stop requests take effect at round boundaries (a round's samples are not saved).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from posttrain.config import ConfigError
from posttrain.config.pref import SELECTIONS, PrefConfig, feedback_kind
from posttrain.data import CompletionTokens, EpochSampler, PreferenceTokens, check_positions
from posttrain.data.encoding import PromptTokens
from posttrain.envs import sample_episodes
from posttrain.objectives.pairing import (
    all_pairs_above_margin,
    best_vs_worst,
    preference_matrix,
    statistical_rejection_pairs,
    threshold_labels,
    top_k_labels,
    win_rates_against,
    win_rates_within_group,
)
from posttrain.objectives.registry import PREFERENCE_LOSSES
from posttrain.policies import Reference
from posttrain.rewards import RewardResult, RewardSet, RewardSpec, load_reward_fn
from posttrain.rewards.inputs import RewardLog, sample_table, score_completions, trainer_state, trl_reward_kwargs
from posttrain.rewards.judges import judge_all_pairs
from posttrain.rewards.metrics import share_correct, verifier_scores
from posttrain.rollout import ENGINES, SamplingParams
from posttrain.rollout.native import GeometricMixture
from posttrain.runtime.logging import phase
from posttrain.trainers.build import build_optimisation, sampling_params
from posttrain.trainers.evaluation import EvalResult, evaluate_with
from posttrain.trainers.lifecycle import Lifecycle, RunResult, sampling_generator
from posttrain.trainers.preference_step import PreferenceStep, Tokens, build_models, logps_per_item
from posttrain.trainers.splits import Rows, load_prompts


def train_online_pref(
    cfg: PrefConfig,
    *,
    model: Any = None,
    tokenizer: Any = None,
    train_rows: Rows | None = None,
    eval_rows: Rows | None = None,
    resume: bool = False,
    progress: bool = True,
) -> RunResult:
    """Optimise preferences in rounds on the policy's own samples. Objects passed in replace the config's;
    train_rows / eval_rows are prompt rows with the columns the rewards or judge read (`answer`, ...)."""
    life = Lifecycle(cfg, kind="pref-online", resume=resume)
    if life.complete:
        return life.finished_result()
    online, loss_fn, device = cfg.online, PREFERENCE_LOSSES[cfg.pref.loss], life.device
    kind = feedback_kind(loss_fn)
    select = online.select or SELECTIONS[kind][0]
    model, tokenizer, reference = build_models(cfg, model, tokenizer, life.checkpoint, device)
    new_tokens = {"online.sampling.max_new_tokens": online.sampling.max_new_tokens}
    check_positions(model, {"data.max_length": cfg.data.max_length, **new_tokens})
    where = {"seed": cfg.seed, "recipe_dir": cfg.recipe_dir, "max_length": cfg.pref.max_prompt_length}
    with phase("reading and encoding the prompts", enabled=progress):  # before the log opens: the flag decides
        train_prompts, report = load_prompts(cfg.data, tokenizer, "train", rows=train_rows, **where)
        eval_split, _ = load_prompts(cfg.data, tokenizer, "eval", rows=eval_rows, limit=cfg.eval.limit, **where)
    eval_prompts = [p for p in eval_split if "answer" in p.extra]
    cfg = life.fit_epochs(len(train_prompts), online.prompts_per_round, round_steps=online.steps_per_round)
    eval_reward = load_reward_fn(cfg.eval.reward, base_dir=cfg.recipe_dir) if eval_prompts else None

    def held_out() -> EvalResult:
        return evaluate_with(model, tokenizer, eval_prompts, eval_reward, cfg.eval,
                             generator=sampling_generator(cfg.seed))  # fmt: skip

    def eval_metrics() -> dict[str, float]:
        return {f"eval_{k}": v for k, v in held_out().metrics().items()}

    feedback = build_feedback(cfg)
    sampler = EpochSampler(len(train_prompts), seed=cfg.seed, report=report)
    optim = build_optimisation(model, cfg.train)
    life.track(model, tokenizer, optim, sampler)
    life.open_log(report, headline=("loss", "sample_accuracy"), progress=progress, train_rows=train_rows,
                  eval_rows=eval_rows)  # fmt: skip
    if life.sharded:
        raise ConfigError("train.parallel: fsdp is for sft, offline pref and rm; online rounds sample on each rank "
                          "apart, which sharded weights cannot (use ddp)")  # fmt: skip
    if online.prompts_per_round % life.ranks.world:
        raise ConfigError(f"online.prompts_per_round={online.prompts_per_round} does not divide among "
                          f"{life.ranks.world} ranks")  # fmt: skip
    update = PreferenceStep.of(cfg, tokenizer.pad_token_id, device, life.history, life.ranks)
    params, _ = sampling_params(online.sampling, tokenizer.eos_token_id)
    initial_eval = life.evaluate_before(eval_metrics if eval_prompts else None, say="initial eval")

    model.train()
    spr, eval_every = online.steps_per_round, cfg.train.eval_every
    with life.stop_requests(), closing(feedback):
        for round_index in range(life.start_step // spr, cfg.train.max_steps // spr):
            if online.reference == "refresh" and reference is not None:
                reference.refresh(model)  # pi_t: the policy that samples this round
            prompts = [train_prompts[i] for i in sampler.take(online.prompts_per_round)]
            prompts = prompts[life.ranks.contiguous_share(len(prompts))]  # this rank's share of the round
            reward_log = RewardLog()
            reward_kwargs = trl_reward_kwargs(trainer_state(round_index * spr, cfg.train.max_steps), reward_log)
            samples = sample_round(model, reference, tokenizer, prompts, feedback, engine=ENGINES[online.engine],
                                   params=params, n=online.samples_per_prompt, opponent=loss_fn.opponents,
                                   mixture_coef=online.mixture_coef, generator=life.generator,
                                   reward_kwargs=reward_kwargs)  # fmt: skip
            life.log_samples((round_index + 1) * spr, partial(round_table, tokenizer, samples, reward_log.columns),
                             steps=spr)  # fmt: skip
            items, extras = build_examples(samples, kind, select=select, margin=online.margin,
                                           label_threshold=online.label_threshold, top_k=online.top_k,
                                           min_score=online.min_score, where=f"round {round_index + 1}",
                                           rejection=(online.rejection_beta, online.rejection_accepted),
                                           generator=life.generator)  # fmt: skip
            ref_cache = None
            if "reference" in loss_fn.needs and items:
                with reference.active():
                    shown = f"reference log-probs of round {round_index + 1}"
                    ref_cache = logps_per_item(reference.model, items, update.micro_batch, update.pad_id, device,
                                               update.bf16, shown=shown)  # fmt: skip
            round_sampler = EpochSampler(len(items), seed=cfg.seed * 100_003 + round_index) if items else None
            round_metrics = {**samples.metrics, **reward_log.means(), "examples": float(len(items)),
                             "round": float(round_index + 1)}  # fmt: skip
            for step in range(round_index * spr, (round_index + 1) * spr):
                started = time.perf_counter()
                indices = round_sampler.take(min(cfg.train.batch_size, len(items))) if round_sampler else []
                cached = [ref_cache[i] for i in indices] if ref_cache is not None else None
                per_example = {k: v[torch.tensor(indices, dtype=torch.long)] for k, v in extras.items()}
                totals = update.accumulate(model, reference, [items[i] for i in indices], ref_logps=cached,
                                           per_example=per_example)  # fmt: skip
                grad_norm = life.update(model, loss=totals.get("loss", 0.0), step=step + 1)
                metrics = update.metrics(totals, int(life.global_sum(len(indices)))) | round_metrics | {
                    "grad_norm": grad_norm, **life.step_metrics(time.perf_counter() - started)
                }  # fmt: skip
                life.record(step + 1, metrics)
            done = (round_index + 1) * spr
            if done < cfg.train.max_steps and crossed(done, spr, eval_every) and eval_prompts:
                life.log_eval(done, life.evaluate(eval_metrics), say=None)
            life.end_span(done, spr)

    generation = None

    def evaluate_at_end() -> dict[str, float]:
        nonlocal generation
        generation = held_out()
        return {f"eval_{k}": v for k, v in generation.metrics().items()}

    final_eval = life.evaluate(evaluate_at_end) if eval_prompts else {}
    return life.finish(final_eval, eval=generation, initial_eval=initial_eval, reference_built=reference is not None)


def crossed(done: int, steps: int, every: int) -> bool:
    """Whether a multiple of `every` (0: never) fell within the `steps` steps that ended at `done`."""
    return bool(every) and done // every > (done - steps) // every


@dataclass
class RoundSamples:
    """One round's completions and what the feedback said about them."""

    prompts: list[PromptTokens]
    completions: list[list[list[int]]]
    """[P][K] completion ids: the policy's N samples, then the opponent's N (if any)."""
    from_reference_P_K: Tensor
    """bool [P, K]: sampled by the reference model (XPO's exploration samples)."""
    scores_P_K: Tensor
    """Summed rewards, or under a judge each completion's win rate among the prompt's K."""
    win_rates_P_N: Tensor | None
    """Each policy sample's win rate against its opponents (the mixture's samples, else its group)."""
    metrics: dict[str, float] = field(default_factory=dict)
    rewards: RewardResult | None = None
    """Each reward's scores of the round's P*K completions (none under a judge)."""


@dataclass
class Feedback:
    """Scalar rewards or a pairwise judge `judge(prompts, completions_a, completions_b, **columns)`, with the
    judge call's time limit."""

    rewards: RewardSet | None = None
    judge: Callable[..., Any] | None = None
    judge_timeout_s: float | None = None

    def close(self) -> None:
        if self.rewards is not None:
            self.rewards.close()


def sample_round(
    policy: Any,
    reference: Reference | None,
    tokenizer: Any,
    prompts: list[PromptTokens],
    feedback: Feedback,
    *,
    engine: Any,
    params: SamplingParams,
    n: int,
    opponent: str | None,
    mixture_coef: float,
    generator: torch.Generator,
    reward_kwargs: dict[str, Any] | None = None,
) -> RoundSamples:
    """Sample N completions per prompt from the policy (and N from `opponent`: "reference" or "mixture"),
    then score every completion of the round with one reward call, or judge every pair of each prompt."""
    started = time.perf_counter()
    sample = dict(n=n, generator=generator, tokenizer=tokenizer)
    sampled = [sample_episodes(engine, policy, prompts, params, **sample)]
    if opponent == "reference":
        with reference.active():
            sampled.append(sample_episodes(engine, reference.model, prompts, params, **sample))
    elif opponent == "mixture":
        sampled.append(sample_episodes(GeometricMixture(reference, mixture_coef), policy, prompts, params, **sample))
    completions = [[c for r in sampled for c in r.completion_ids[i * n : (i + 1) * n]] for i in range(len(prompts))]
    generated = time.perf_counter()
    k = len(completions[0])
    verdicts_P_K, scored = None, None
    if feedback.rewards is not None:
        ids = [c for group in completions for c in group]
        scored = score_completions(feedback.rewards, tokenizer, prompts, ids, k, reward_kwargs)
        scores_P_K = scored.total.view(len(prompts), k)
        prefs_P_K_K = preference_matrix(scores_P_K)
        verdicts_N = verifier_scores(scored)
        verdicts_P_K = None if verdicts_N is None else verdicts_N.view(len(prompts), k)
    else:
        prefs_P_K_K = judge_all_pairs(feedback.judge, tokenizer, prompts, completions, feedback.judge_timeout_s)
        scores_P_K = win_rates_within_group(prefs_P_K_K)
    win_rates_P_N = None
    if opponent == "mixture":
        win_rates_P_N = win_rates_against(prefs_P_K_K[:, :n, n:])
    elif n >= 2:
        win_rates_P_N = win_rates_within_group(prefs_P_K_K[:, :n, :n])
    from_reference_P_K = torch.zeros(len(prompts), k, dtype=torch.bool)
    from_reference_P_K[:, n:] = opponent == "reference"
    policy_scores_PN = scores_P_K[:, :n].flatten()
    lengths = [len(c) for r in sampled[:1] for c in r.completion_ids]
    metrics = {
        "sample_score": policy_scores_PN.mean().item(),
        "completion_length": sum(lengths) / len(lengths),
        "gen_s": generated - started,
        "score_s": time.perf_counter() - generated,
    }
    if verdicts_P_K is not None:
        metrics["sample_accuracy"] = share_correct(verdicts_P_K[:, :n].flatten())
    if opponent is not None:
        metrics["opponent_score"] = scores_P_K[:, n:].mean().item()
    return RoundSamples(prompts, completions, from_reference_P_K, scores_P_K, win_rates_P_N, metrics, scored)


def round_table(tokenizer: Any, samples: RoundSamples, logged: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The round's completions as sampled-completion rows (`rewards.inputs.sample_table`); under a judge, `reward`
    is each completion's win rate among its prompt's."""
    k = samples.scores_P_K.shape[1]
    ids = [c for group in samples.completions for c in group]
    scores = samples.rewards or RewardResult(samples.scores_P_K.flatten(), {}, {}, {})
    return sample_table(tokenizer, samples.prompts, ids, k, scores, logged)


def build_examples(
    samples: RoundSamples,
    kind: str,
    *,
    select: str,
    margin: float,
    label_threshold: float,
    top_k: int,
    min_score: float | None,
    where: str,
    rejection: tuple[float, int] = (0.5, 2),
    generator: torch.Generator | None = None,
) -> tuple[list[Tokens], dict[str, Tensor]]:
    """The round's examples of a loss's data kind, and per-example extras (first axis = example):
    pairs by `select` (best_vs_worst, all_pairs; rso with `rejection` = (beta, accepted per prompt) and `generator`)
    with which side the reference sampled; unpaired rows
    labelled by `select` (threshold, top_k; rows labelled -1 are left out); or each prompt's N policy
    samples as a list with their scores and win rates."""
    s, prompts = samples, samples.prompts
    if kind == "preference":
        if select == "rso":
            beta, accepted = rejection
            pairs_M_3 = statistical_rejection_pairs(s.scores_P_K, beta=beta, num_accepted=accepted, generator=generator)
        else:
            pick = best_vs_worst if select == "best_vs_worst" else all_pairs_above_margin
            pairs_M_3 = pick(s.scores_P_K, margin=margin)
        items = [PreferenceTokens(prompts[p].prompt_ids, s.completions[p][i], s.completions[p][j],
                                  f"{where} {prompts[p].where}") for p, i, j in pairs_M_3.tolist()]  # fmt: skip
        p, i, j = pairs_M_3.unbind(dim=1)
        ref_P_K = s.from_reference_P_K
        extras = {"chosen_from_reference": ref_P_K[p, i], "rejected_from_reference": ref_P_K[p, j]}
        return items, extras  # type: ignore[return-value]
    if kind == "unpaired":
        labels_P_K = (
            threshold_labels(s.scores_P_K, threshold=label_threshold)
            if select == "threshold"
            else top_k_labels(s.scores_P_K, k=top_k, min_score=min_score)
        )
        kept = (labels_P_K >= 0).nonzero().tolist()
        items = [CompletionTokens(prompts[p].prompt_ids, [s.completions[p][i]], f"{where} {prompts[p].where}",
                                  label=bool(labels_P_K[p, i])) for p, i in kept]  # fmt: skip
        return items, {}  # type: ignore[return-value]
    n = len(s.completions[0]) if s.win_rates_P_N is None else s.win_rates_P_N.shape[1]
    items = [CompletionTokens(prompts[p].prompt_ids, s.completions[p][:n], f"{where} {prompts[p].where}",
                              scores=s.scores_P_K[p, :n].tolist()) for p in range(len(prompts))]  # fmt: skip
    return items, ({} if s.win_rates_P_N is None else {"win_rates_N_K": s.win_rates_P_N})  # type: ignore[return-value]


def build_feedback(cfg: PrefConfig) -> Feedback:
    online = cfg.online
    if online.judge is not None:
        judge = load_reward_fn(online.judge.fn, online.judge.args, base_dir=cfg.recipe_dir)
        return Feedback(judge=judge, judge_timeout_s=online.judge.timeout_s)
    specs = [RewardSpec(**entry.model_dump()) for entry in online.rewards]
    return Feedback(RewardSet.from_specs(specs, cfg.recipe_dir, max_failure_fraction=online.max_failure_fraction))
