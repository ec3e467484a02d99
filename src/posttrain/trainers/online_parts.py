"""The parts the online preference loop (`trainers/online_preference.py`) assembles: a round's samples from
the policy (and, for the losses that declare it, from an opponent: the reference, or the geometric mixture
of policy and reference), their scores from scalar rewards or a pairwise judge, and the examples a loss
consumes, chosen by the pure selections of `objectives/pairing.py`.

Axes: P prompts of the round, N policy samples per prompt, K = N (+ N opponent samples) per prompt.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from posttrain.data import CompletionTokens, PreferenceTokens
from posttrain.data.encoding import PromptTokens
from posttrain.objectives.pairing import (
    all_pairs_above_margin,
    best_vs_worst,
    preference_matrix,
    threshold_labels,
    top_k_labels,
    win_rates_against,
    win_rates_within_group,
)
from posttrain.policies import Reference
from posttrain.rewards import RewardFailureError, RewardSet, call_within, describe_failure
from posttrain.rollout import SamplingParams
from posttrain.rollout.native import generate_geometric_mixture
from posttrain.trainers.offline import Tokens
from posttrain.trainers.rl_parts import score_groups, share_correct, verifier_scores


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


@dataclass
class Feedback:
    """Scalar rewards or a pairwise judge `judge(prompts, completions_a, completions_b, **columns)`, with the
    judge call's time limit."""

    rewards: RewardSet | None = None
    judge: Callable[..., Any] | None = None
    judge_timeout_s: float | None = None


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
    was_training = policy.training
    policy.eval()
    prompt_ids = [p.prompt_ids for p in prompts]
    sampled = [engine.generate(policy, prompt_ids, params, n=n, generator=generator, tokenizer=tokenizer)]
    if opponent == "reference":
        with reference.active():
            sampled.append(engine.generate(reference.model, prompt_ids, params, n=n, generator=generator,
                                           tokenizer=tokenizer))  # fmt: skip
    elif opponent == "mixture":
        sampled.append(
            generate_geometric_mixture(
                policy,
                reference,
                prompt_ids,
                params,
                n=n,
                mixture_coef=mixture_coef,
                generator=generator,
                tokenizer=tokenizer,
            )
        )
    policy.train(was_training)
    completions = [[c for r in sampled for c in r.completion_ids[i * n : (i + 1) * n]] for i in range(len(prompts))]
    generated = time.perf_counter()
    k = len(completions[0])
    verdicts_P_K = None
    if feedback.rewards is not None:
        ids = [c for group in completions for c in group]
        scored = score_groups(feedback.rewards, tokenizer, prompts, ids, k, reward_kwargs)
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
    return RoundSamples(prompts, completions, from_reference_P_K, scores_P_K, win_rates_P_N, metrics)


def judge_all_pairs(
    judge: Callable[..., Any],
    tokenizer: Any,
    prompts: list[PromptTokens],
    completions: list[list[list[int]]],
    timeout_s: float | None = None,
) -> Tensor:
    """prefs_P_K_K from one judge call over every unordered pair (i < j) of each prompt's completions:
    pref[i, j] = the judge's P(i preferred to j), pref[j, i] = 1 - pref[i, j], pref[i, i] = 1/2.
    A call that raises or runs past `timeout_s` stops the run (`RewardFailureError`)."""
    k = len(completions[0])
    upper = [(i, j) for i in range(k) for j in range(i + 1, k)]
    texts = [tokenizer.batch_decode(group, skip_special_tokens=True) for group in completions]
    prompt_texts = tokenizer.batch_decode([p.prompt_ids for p in prompts], skip_special_tokens=True)
    keys = sorted({key for p in prompts for key in p.extra})
    rows = [(p, i, j) for p in range(len(prompts)) for i, j in upper]
    kwargs = {
        "prompts": [prompt_texts[p] for p, _, _ in rows],
        "completions_a": [texts[p][i] for p, i, _ in rows],
        "completions_b": [texts[p][j] for p, _, j in rows],
        **{key: [prompts[p].extra.get(key) for p, _, _ in rows] for key in keys},
    }
    verdicts, error = call_within(judge, kwargs, timeout_s)
    if error is None:
        try:
            values = torch.tensor([float(v) for v in verdicts], dtype=torch.float32)
        except Exception as unreadable:  # a judge is user code: say which call failed, not where inside torch
            error = unreadable
    if error is not None:
        name = getattr(judge, "__name__", repr(judge))
        raise RewardFailureError(
            f"online.judge '{name}' failed on a round of {len(rows)} comparisons: {describe_failure(error)}"
        ) from error
    if len(values) != len(rows) or not bool(((values >= 0) & (values <= 1)).all()):
        raise ValueError(
            f"online.judge returned {len(values)} values for {len(rows)} comparisons; it must return one "
            "probability in [0, 1] per row (that completions_a is preferred to completions_b)"
        )
    prefs_P_K_K = torch.full((len(prompts), k, k), 0.5)
    if rows:
        index = torch.tensor(rows)
        prefs_P_K_K[index[:, 0], index[:, 1], index[:, 2]] = values
        prefs_P_K_K[index[:, 0], index[:, 2], index[:, 1]] = 1.0 - values
    return prefs_P_K_K


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
) -> tuple[list[Tokens], dict[str, Tensor]]:
    """The round's examples of a loss's data kind, and per-example extras (first axis = example):
    pairs by `select` (best_vs_worst, all_pairs) with which side the reference sampled; unpaired rows
    labelled by `select` (threshold, top_k; rows labelled -1 are left out); or each prompt's N policy
    samples as a list with their scores and win rates."""
    s, prompts = samples, samples.prompts
    if kind == "preference":
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
