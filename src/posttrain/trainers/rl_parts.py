"""The parts the online RL loop (`trainers/rl.py`) assembles: sampling and scoring a step's groups, what
objectives declare in `needs`, the critic, the moving baseline, and one minibatch update.

Objectives are called with the inputs their signatures name (`call_with`), so the loop never looks at an
objective's name. No loss maths lives here: every formula is a registered function in `objectives/`.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from posttrain.data.encoding import PromptTokens
from posttrain.objectives.policy_losses import entropy_bonus
from posttrain.objectives.value import clipped_value_loss
from posttrain.policies import token_logprobs
from posttrain.rewards import RewardResult, RewardSet
from posttrain.rollout import Rollouts, SamplingParams
from posttrain.rollout.engine import PaddedRollouts

BASELINE_DECAY = 0.9
"""EMA decay of the moving reward baseline (b <- 0.9 b + 0.1 mean r): about ten steps of memory."""


def call_with(fn: Callable[..., Any], available: Mapping[str, Any], hyper: Mapping[str, Any] = {}) -> Any:
    """Call `fn` with the parameters its signature names: from `hyper` first, then from `available`.

    A parameter named by neither keeps its default; `hyper` keys the function does not name are not
    passed (configs reject unknown keys at load time, see `config.rl.check_registered`).
    """
    kwargs = {}
    for name in inspect.signature(fn).parameters:
        if name in hyper:
            kwargs[name] = hyper[name]
        elif name in available:
            kwargs[name] = available[name]
    return fn(**kwargs)


@dataclass
class Scored:
    """A step's sampled groups and their scores: prompt i owns completions i*G .. i*G + G - 1."""

    prompts: list[PromptTokens]
    rollouts: Rollouts
    rewards: RewardResult
    gen_s: float = 0.0
    score_s: float = 0.0
    dropped_groups: int = 0


def score_rollouts(
    reward_set: RewardSet, tokenizer: Any, prompts: list[PromptTokens], rollouts: Rollouts
) -> RewardResult:
    """Decode and score P*G completions; each row's columns (`answer`, ...) go to the rewards."""
    n = rollouts.group_size
    texts = tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
    prompt_texts = tokenizer.batch_decode([p.prompt_ids for p in prompts], skip_special_tokens=True)
    keys = sorted({k for p in prompts for k in p.extra})
    columns = {k: [p.extra.get(k) for p in prompts for _ in range(n)] for k in keys}
    return reward_set.score([t for t in prompt_texts for _ in range(n)], texts, rollouts.completion_ids, columns)


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
) -> Scored:
    started = time.perf_counter()
    was_training = policy.training
    policy.eval()
    rollouts = engine.generate(
        policy, [p.prompt_ids for p in prompts], params, n=group_size, generator=generator, tokenizer=tokenizer
    )
    policy.train(was_training)
    generated = time.perf_counter()
    rewards = score_rollouts(reward_set, tokenizer, prompts, rollouts)
    return Scored(prompts, rollouts, rewards, generated - started, time.perf_counter() - generated)


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


def reward_metrics(rewards: RewardResult) -> dict[str, float]:
    """Mean and std (population; not-applicable samples skipped) of each reward and of the total, and
    `accuracy`: the share of completions whose total reward is at least 1 (a verifier's "correct")."""
    metrics: dict[str, float] = {}
    for name, scores_N in {**rewards.per_reward, "total": rewards.total}.items():
        applicable = scores_N[~scores_N.isnan()]
        metrics[f"rewards/{name}/mean"] = applicable.mean().item() if len(applicable) else float("nan")
        metrics[f"rewards/{name}/std"] = applicable.std(unbiased=False).item() if len(applicable) else float("nan")
    metrics |= {f"rewards/{name}/failures": float(n) for name, n in rewards.failures.items()}
    metrics["accuracy"] = (rewards.total >= 1.0).float().mean().item()
    return metrics


def outcome_at_last_token(rewards_PG: Tensor, mask_B_T: Tensor) -> Tensor:
    """[B, T] with each completion's scalar reward on its last generated token, 0 elsewhere."""
    positions_B_T = torch.arange(mask_B_T.shape[1], device=mask_B_T.device).expand_as(mask_B_T)
    last_B = torch.where(mask_B_T, positions_B_T, -1).max(dim=1).values
    is_last_B_T = (positions_B_T == last_B[:, None]) & mask_B_T
    return is_last_B_T.float() * rewards_PG.to(mask_B_T.device)[:, None]


def per_token(adv: Tensor, mask_B_T: Tensor) -> Tensor:
    """An advantage of [P*G] broadcast over each completion's tokens, or a [B, T] one; 0 off the mask."""
    adv_B_T = adv[:, None].expand(mask_B_T.shape) if adv.dim() == 1 else adv
    return torch.where(mask_B_T, adv_B_T.to(torch.float32), 0.0).detach()


class ValueModel(torch.nn.Module):
    """A critic: a copy of the policy's backbone with a scalar head (initialised to 0).

    values_B_T[b, t] is the value of the state in which token t is chosen, read from the hidden state at
    t - 1, so it is aligned with tokens like every per-token tensor (column 0 is 0)."""

    def __init__(self, policy: Any):
        super().__init__()
        self.backbone = copy.deepcopy(policy.get_decoder())
        self.head = torch.nn.Linear(policy.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, input_ids_B_T: Tensor, attention_mask_B_T: Tensor) -> Tensor:
        hidden_B_T_H = self.backbone(input_ids=input_ids_B_T, attention_mask=attention_mask_B_T, use_cache=False)
        v_B_T = self.head(hidden_B_T_H.last_hidden_state).squeeze(-1).float()
        return torch.cat([torch.zeros_like(v_B_T[:, :1]), v_B_T[:, :-1]], dim=1)


def frozen_copy(model: Any) -> Any:
    """The reference policy: a copy of the initial policy that never trains."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


@dataclass
class MovingBaseline:
    """Exponential moving average of past batch mean rewards (the `moving_baseline` need)."""

    value: float = 0.0
    steps: int = 0

    def update(self, rewards_PG: Tensor) -> None:
        mean = rewards_PG.mean().item()
        self.value = mean if self.steps == 0 else BASELINE_DECAY * self.value + (1 - BASELINE_DECAY) * mean
        self.steps += 1


@torch.no_grad()
def batched_forward(fn: Callable[[slice], Tensor], batch_size: int, micro_batch_size: int | None) -> Tensor:
    """Concatenate fn(rows) over micro-batches of rows (memory only)."""
    size = micro_batch_size or batch_size
    return torch.cat([fn(slice(s, s + size)) for s in range(0, batch_size, size)])


@dataclass
class UpdateStats:
    """Sums over a step's updates, turned into per-token means by `means`."""

    sums: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value

    def means(self, num_updates: int, token_visits: int) -> dict[str, float]:
        """`tok/` sums over `token_visits` (tokens x epochs), the others over `num_updates`."""
        out = {k: v / max(1, token_visits) for k, v in self.sums.items() if k.startswith("tok/")}
        out = {k.removeprefix("tok/"): v for k, v in out.items()}
        return out | {k: v / max(1, num_updates) for k, v in self.sums.items() if not k.startswith("tok/")}


@dataclass
class StepTensors:
    """One step's rollouts as tensors on the training device, plus what the objectives consume."""

    padded: PaddedRollouts
    adv_B_T: Tensor
    ref_logp_B_T: Tensor | None = None
    old_values_B_T: Tensor | None = None
    returns_B_T: Tensor | None = None


def update_minibatch(
    policy: Any,
    critic: ValueModel | None,
    step: StepTensors,
    rows: Tensor,
    *,
    policy_loss: Callable[..., Any],
    policy_loss_args: Mapping[str, Any],
    aggregation: Callable[..., Any],
    kl_estimator: Callable[..., Any] | None,
    kl_coef_in_loss: float,
    entropy_coef: float,
    value_coef: float,
    value_clip_range: float,
    temperature: float,
    max_len: int,
    micro_batch_size: int | None,
    stats: UpdateStats,
) -> None:
    """Accumulate the gradients of one minibatch (`rows` of the step), micro-batch by micro-batch.

    Aggregation divides by the minibatch's counts (tokens, sequences), so the summed micro-batch losses
    equal the whole minibatch's loss whatever `micro_batch_size` is."""
    p = step.padded
    counts = {"num_tokens": int(p.loss_mask_B_T[rows].sum()), "num_seqs": len(rows), "max_len": max_len}
    size = micro_batch_size or len(rows)
    for start in range(0, len(rows), size):
        mb = rows[start : start + size]
        ids_B_T, attn_B_T, mask_B_T = p.input_ids_B_T[mb], p.attention_mask_B_T[mb], p.loss_mask_B_T[mb]
        logp_B_T, entropy_B_T = token_logprobs(policy, ids_B_T, attn_B_T, mask_B_T, temperature=temperature)
        inputs = {
            "logp_B_T": logp_B_T,
            "old_logp_B_T": p.old_logp_B_T[mb],
            "adv_B_T": step.adv_B_T[mb],
            "mask_B_T": mask_B_T,
        }
        loss_B_T, clipped_B_T = call_with(policy_loss, inputs, policy_loss_args)
        if kl_estimator is not None:
            kl_B_T = torch.where(mask_B_T, kl_estimator(logp_B_T, step.ref_logp_B_T[mb]), 0.0)
            loss_B_T = loss_B_T + kl_coef_in_loss * kl_B_T
            stats.add("tok/kl", kl_B_T.detach().sum().item())
        if entropy_coef:
            loss_B_T = loss_B_T + entropy_bonus(entropy_B_T, coef=entropy_coef)
        loss = call_with(aggregation, {"loss_B_T": loss_B_T, "mask_B_T": mask_B_T, **counts})
        loss.backward()
        stats.add("loss", loss.item())
        stats.add("tok/clip_fraction", clipped_B_T[mask_B_T].sum().item())
        stats.add("tok/entropy", entropy_B_T[mask_B_T].detach().sum().item())
        stats.add("tok/sampler_logp_gap", (logp_B_T - p.old_logp_B_T[mb])[mask_B_T].detach().abs().sum().item())
        if critic is not None:
            values_B_T = critic(ids_B_T, attn_B_T)
            v_loss_B_T = clipped_value_loss(
                values_B_T, step.old_values_B_T[mb], step.returns_B_T[mb], clip_range=value_clip_range
            )
            v_loss = value_coef * call_with(aggregation, {"loss_B_T": v_loss_B_T, "mask_B_T": mask_B_T, **counts})
            v_loss.backward()
            stats.add("value_loss", v_loss.item())
