"""The sampling side of the online RL loop (`trainers/rl.py`): sample and score a step's groups, DAPO's
dynamic sampling, and the reward metrics. The update side is `trainers/rl_update.py`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from posttrain.data.encoding import PromptTokens
from posttrain.rewards import RewardResult, RewardSet
from posttrain.rewards.inputs import reward_completions, reward_prompts, row_columns
from posttrain.rollout import Rollouts, SamplingParams


@dataclass
class Scored:
    """A step's sampled groups and their scores: prompt i owns completions i*G .. i*G + G - 1."""

    prompts: list[PromptTokens]
    rollouts: Rollouts
    rewards: RewardResult
    gen_s: float = 0.0
    score_s: float = 0.0
    dropped_groups: int = 0


def score_groups(
    reward_set: RewardSet,
    tokenizer: Any,
    prompts: list[PromptTokens],
    completion_ids: list[list[int]],
    n: int,
    extra_kwargs: dict[str, Any] | None = None,
) -> RewardResult:
    """Decode and score P*n completions, each prompt's n contiguous, calling the rewards as TRL does
    (`rewards.inputs`): the prompts as written, conversational completions as messages, each row's columns
    (`answer`, ...), and `extra_kwargs` (`trainer_state`, `log_metric`, `log_extra`)."""
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    prompts_N = reward_prompts(prompts, tokenizer, n)
    return reward_set.score(prompts_N, reward_completions(prompts_N, texts), completion_ids,
                            row_columns(prompts, n), extra_kwargs=extra_kwargs)  # fmt: skip


def sample_and_score(
    engine: Any,
    policy: Any,
    tokenizer: Any,
    reward_set: RewardSet,
    prompts: list[PromptTokens],
    params: SamplingParams,
    *,
    group_size: int,
    generator: torch.Generator,
    reward_kwargs: dict[str, Any] | None = None,
) -> Scored:
    started = time.perf_counter()
    was_training = policy.training
    policy.eval()
    rollouts = engine.generate(
        policy, [p.prompt_ids for p in prompts], params, n=group_size, generator=generator, tokenizer=tokenizer
    )
    policy.train(was_training)
    generated = time.perf_counter()
    rewards = score_groups(reward_set, tokenizer, prompts, rollouts.completion_ids, group_size, reward_kwargs)
    return Scored(prompts, rollouts, rewards, generated - started, time.perf_counter() - generated)


def draw_step(draw: Callable[[], Scored], num_groups: int, dynamic_max_batches: int) -> Scored:
    """One step's scored groups: a single draw, or DAPO's dynamic sampling when `dynamic_max_batches` > 0."""
    if dynamic_max_batches:
        return keep_informative_groups(draw, num_groups=num_groups, max_batches=dynamic_max_batches)
    return draw()


def keep_informative_groups(draw: Callable[[], Scored], *, num_groups: int, max_batches: int) -> Scored:
    """DAPO's dynamic sampling (arXiv:2503.14476, Sec. 3.2): keep groups whose rewards differ, drawing
    more batches until `num_groups` are kept or `max_batches` were drawn (then train on what is kept;
    if nothing is, on the last batch)."""
    kept: list[Scored] = []
    have, dropped, gen_s, score_s = 0, 0, 0.0, 0.0
    for _ in range(max_batches):
        scored = draw()
        gen_s, score_s = gen_s + scored.gen_s, score_s + scored.score_s
        g = scored.rollouts.group_size
        total_P_G = scored.rewards.total.view(-1, g)
        informative = (total_P_G.max(dim=1).values > total_P_G.min(dim=1).values).nonzero().flatten().tolist()
        dropped += total_P_G.shape[0] - len(informative)
        informative = informative[: num_groups - have]
        if informative:
            kept.append(select_groups(scored, informative))
            have += len(informative)
        if have >= num_groups:
            break
    merged = merge_scored(kept) if kept else scored
    merged.gen_s, merged.score_s, merged.dropped_groups = gen_s, score_s, dropped
    return merged


def select_groups(scored: Scored, groups: list[int]) -> Scored:
    g = scored.rollouts.group_size
    rows = [i * g + j for i in groups for j in range(g)]
    r = scored.rollouts
    rollouts = Rollouts(
        prompt_ids=[r.prompt_ids[i] for i in groups],
        completion_ids=[r.completion_ids[i] for i in rows],
        logprobs=[r.logprobs[i] for i in rows],
        finish_reasons=[r.finish_reasons[i] for i in rows],
        group_size=g,
        model_token_mask=[r.model_token_mask[i] for i in rows],
        infos=[r.infos[i] for i in rows],
    )
    index = torch.tensor(rows)
    rewards = RewardResult(
        total=scored.rewards.total[index],
        per_reward={k: v[index] for k, v in scored.rewards.per_reward.items()},
        failures=dict(scored.rewards.failures),
        metrics={},
    )
    return Scored([scored.prompts[i] for i in groups], rollouts, rewards)


def merge_scored(parts: list[Scored]) -> Scored:
    first = parts[0]
    rollouts = Rollouts(
        prompt_ids=[p for s in parts for p in s.rollouts.prompt_ids],
        completion_ids=[c for s in parts for c in s.rollouts.completion_ids],
        logprobs=[x for s in parts for x in s.rollouts.logprobs],
        finish_reasons=[x for s in parts for x in s.rollouts.finish_reasons],
        group_size=first.rollouts.group_size,
        model_token_mask=[x for s in parts for x in s.rollouts.model_token_mask],
        infos=[x for s in parts for x in s.rollouts.infos],
    )
    rewards = RewardResult(
        total=torch.cat([s.rewards.total for s in parts]),
        per_reward={k: torch.cat([s.rewards.per_reward[k] for s in parts]) for k in first.rewards.per_reward},
        failures={k: sum(s.rewards.failures[k] for s in parts) for k in first.rewards.failures},
        metrics={},
    )
    return Scored([p for s in parts for p in s.prompts], rollouts, rewards)


def reward_metrics(rewards: RewardResult, verifier: str | None = None) -> dict[str, float]:
    """Mean and std (population; not-applicable samples skipped) of each reward and of the total, and
    `accuracy`: the share of completions that `verifier` (a reward's name, eval.reward) scores at least 1, among
    those it applies to (`verifier_scores`, `share_correct`); none without such a reward."""
    metrics: dict[str, float] = {}
    for name, scores_N in {**rewards.per_reward, "total": rewards.total}.items():
        applicable = scores_N[~scores_N.isnan()]
        metrics[f"rewards/{name}/mean"] = applicable.mean().item() if len(applicable) else float("nan")
        metrics[f"rewards/{name}/std"] = applicable.std(unbiased=False).item() if len(applicable) else float("nan")
    metrics |= {f"rewards/{name}/failures": float(n) for name, n in rewards.failures.items()}
    verdicts_N = verifier_scores(rewards, verifier)
    if verdicts_N is not None:
        metrics["accuracy"] = share_correct(verdicts_N)
    return metrics


def verifier_scores(rewards: RewardResult, verifier: str | None = None) -> Tensor | None:
    """The raw scores [N] of the reward named `verifier`, else of the only reward, else None: with several rewards
    the total is no verifier's verdict (a length penalty pulls it below 1, a format reward pushes it above)."""
    if verifier in rewards.per_reward:
        return rewards.per_reward[verifier]
    return next(iter(rewards.per_reward.values())) if len(rewards.per_reward) == 1 else None


def share_correct(scores_N: Tensor) -> float:
    """The share of scores of at least 1 (a verifier's "correct") among those that apply (not NaN); NaN for none."""
    applicable_N = scores_N[~scores_N.isnan()]
    return (applicable_N >= 1.0).float().mean().item() if len(applicable_N) else float("nan")
