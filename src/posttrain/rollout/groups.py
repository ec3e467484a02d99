"""A step's sampled groups with their scores, and DAPO's dynamic sampling over them (which groups a step keeps).

Prompt i of a step owns completions i*G .. i*G + G - 1 throughout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.data.encoding import PromptTokens
from posttrain.rewards import RewardResult
from posttrain.rollout.engine import Rollouts


@dataclass
class Scored:
    """A step's sampled groups and their scores: prompt i owns completions i*G .. i*G + G - 1."""

    prompts: list[PromptTokens]
    rollouts: Rollouts
    rewards: RewardResult
    gen_s: float = 0.0
    score_s: float = 0.0
    dropped_groups: int = 0


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
    rollouts = scored.rollouts.select(rows, groups)
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
    rollouts = Rollouts.concat([s.rollouts for s in parts])
    rewards = RewardResult(
        total=torch.cat([s.rewards.total for s in parts]),
        per_reward={k: torch.cat([s.rewards.per_reward[k] for s in parts]) for k in first.rewards.per_reward},
        failures={k: sum(s.rewards.failures[k] for s in parts) for k in first.rewards.failures},
        metrics={},
    )
    return Scored([p for s in parts for p in s.prompts], rollouts, rewards)


def filtration_weights(rewards_B: Tensor, *, method: str, weight_pow: float = 2.0) -> Tensor:
    """PF-PPO's sampling weights (Zhang et al. 2024, arXiv:2409.06957; the authors' `compute_pf_ppo_reweight_data`,
    github.com/DtYXs/verl, branch pf-ppo), from the rewards of a whole step's completions (not per prompt):

        pow:         |r|^weight_pow
        max_min:     1 where r is the step's highest or lowest reward, else 0
        max_random:  0.4 where r is the step's highest reward, else 0.1

    then + 1e-8 (the authors' floor, so every weight is positive). rewards_B: [B]. Returns [B].
    """
    if method == "pow":
        weights_B = rewards_B.abs().pow(weight_pow)
    elif method == "max_min":
        weights_B = ((rewards_B == rewards_B.max()) | (rewards_B == rewards_B.min())).to(rewards_B.dtype)
    elif method == "max_random":
        weights_B = torch.where(rewards_B == rewards_B.max(), 0.4, 0.1).to(rewards_B.dtype)
    else:
        raise ValueError(f"rl.filtration.method: '{method}' is not one of pow, max_min, max_random")
    return (weights_B + 1e-8).clamp(min=1e-8)


def filtered_rows(
    rewards_B: Tensor, *, method: str, weight_pow: float, generator: torch.Generator | None = None
) -> Tensor:
    """PF-PPO's resampled step: B row indices drawn with replacement in proportion to `filtration_weights` (the
    authors' `torch.multinomial(weights, batch_size, replacement=True)`). rewards_B: [B]. Returns int64 [B]."""
    weights_B = filtration_weights(rewards_B.detach().double(), method=method, weight_pow=weight_pow)
    return torch.multinomial(weights_B, len(weights_B), replacement=True, generator=generator)
