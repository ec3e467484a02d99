"""The update side of the online RL loop (`trainers/rl.py`): per-token advantages, the critic, the
reference, the moving baseline, and one minibatch's gradient accumulation.

No loss maths lives here: every formula is a registered function in `objectives/`, called with the
inputs its signature names (`call_with`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from posttrain.objectives.policy_losses import entropy_bonus
from posttrain.objectives.registry import call_with
from posttrain.objectives.value import clipped_value_loss, lambda_returns
from posttrain.policies import Reference, hidden_states_at, token_logprobs
from posttrain.rollout.engine import PaddedRollouts

BASELINE_DECAY = 0.9
"""EMA decay of the moving reward baseline (b <- 0.9 b + 0.1 mean r): about ten steps of memory."""


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

    def forward(self, input_ids_B_T: Tensor, attention_mask_B_T: Tensor, read_mask_B_T: Tensor | None = None) -> Tensor:
        """Values [B, T] float32 at the positions of `read_mask_B_T` (bool [B, T]; None: every position after a
        real token), 0 elsewhere. The backbone computes only the hidden states these values read, on real
        tokens only for Llama-family models (`hidden_states_at`), as the policy's forward does."""
        real_B_T = attention_mask_B_T.bool()
        read_B_T = torch.zeros_like(real_B_T)
        read_B_T[:, 1:] = real_B_T[:, :-1] if read_mask_B_T is None else read_mask_B_T[:, 1:]
        source_B_T = torch.zeros_like(read_B_T)  # the hidden states read: value t comes from t - 1
        source_B_T[:, :-1] = read_B_T[:, 1:]
        hidden_M_H = hidden_states_at(self.backbone, input_ids_B_T, attention_mask_B_T, None, source_B_T)
        v_M = self.head(hidden_M_H).squeeze(-1).float()
        return torch.zeros_like(read_B_T, dtype=torch.float32).masked_scatter(read_B_T, v_M)


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
    rewards_PG: Tensor
    """The sequence rewards the advantage read: the step's, minus coef * summed KL when the KL is in the reward."""
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
            kl_inputs = {**inputs, "ref_logp_B_T": step.ref_logp_B_T[mb]}  # by name: k3_bias_corrected reads old_logp
            kl_B_T = torch.where(mask_B_T, call_with(kl_estimator, kl_inputs), 0.0)
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
            values_B_T = critic(ids_B_T, attn_B_T, mask_B_T)
            v_loss_B_T = clipped_value_loss(
                values_B_T, step.old_values_B_T[mb], step.returns_B_T[mb], clip_range=value_clip_range
            )
            v_loss = value_coef * call_with(aggregation, {"loss_B_T": v_loss_B_T, "mask_B_T": mask_B_T, **counts})
            v_loss.backward()
            stats.add("value_loss", v_loss.item())


@dataclass(frozen=True)
class Objectives:
    """The registered functions a run's config names, looked up once."""

    advantage: Callable[..., Any]
    policy_loss: Callable[..., Any]
    aggregation: Callable[..., Any]
    kl_estimator: Callable[..., Any]


def sequence_forward(
    net: Any, fn: Callable[..., Tensor], padded: PaddedRollouts, micro_batch_size: int | None
) -> Tensor:
    """fn(net, input_ids, attention_mask, loss_mask) over the step's rows, micro-batch by micro-batch."""

    def rows(sel: slice) -> Tensor:
        return fn(net, padded.input_ids_B_T[sel], padded.attention_mask_B_T[sel], padded.loss_mask_B_T[sel])

    return batched_forward(rows, len(padded.loss_mask_B_T), micro_batch_size)


def prepare_step(
    padded: PaddedRollouts,
    available: dict[str, Any],
    objectives: Objectives,
    *,
    advantage_args: Mapping[str, Any],
    reference: Reference | None,
    critic: ValueModel | None,
    kl_coef: float,
    kl_in_reward: bool,
    temperature: float,
    micro_batch_size: int | None,
) -> tuple[StepTensors, Tensor]:
    """The step's advantages (and the critic's targets), with what the estimator declares in `needs`.

    `available` holds the step's rewards and whatever else the loop has already supplied (group size,
    greedy-rollout rewards, the moving baseline). With the KL in the reward, both the token rewards and the
    sequence rewards are shaped, r - coef * sum_t KL_t for the latter (RLOO, arXiv:2402.14740, and TRL shape the
    reward before the baseline), so every estimator sees it whichever it reads. Returns the tensors the updates
    consume and the per-token KL to the reference at sampling time ([B, T], zeros without a reference).
    """
    mask_B_T = padded.loss_mask_B_T
    tensors = StepTensors(padded, adv_B_T=torch.empty(0), rewards_PG=available["rewards_PG"])
    token_rewards_B_T = outcome_at_last_token(available["rewards_PG"], mask_B_T)
    kl_B_T = torch.zeros_like(token_rewards_B_T)
    if reference is not None:
        with reference.active():
            tensors.ref_logp_B_T = sequence_forward(
                reference.model, lambda m, i, a, t: token_logprobs(m, i, a, t, temperature=temperature)[0], padded,
                micro_batch_size,
            )  # fmt: skip
        old, ref = padded.old_logp_B_T, tensors.ref_logp_B_T  # at sampling time pi = pi_old
        at_sampling = {"logp_B_T": old, "old_logp_B_T": old, "ref_logp_B_T": ref}
        kl_B_T = torch.where(mask_B_T, call_with(objectives.kl_estimator, at_sampling), 0.0)
        if kl_in_reward:
            token_rewards_B_T = token_rewards_B_T - kl_coef * kl_B_T
            tensors.rewards_PG = available["rewards_PG"] - kl_coef * kl_B_T.sum(dim=1)
    available = available | {
        "mask_B_T": mask_B_T, "token_rewards_B_T": token_rewards_B_T, "rewards_PG": tensors.rewards_PG,
    }  # fmt: skip
    if critic is not None:
        values_B_T = sequence_forward(critic, lambda m, i, a, t: m(i, a, t), padded, micro_batch_size)
        tensors.old_values_B_T = available["values_B_T"] = torch.where(mask_B_T, values_B_T, 0.0)
        tensors.returns_B_T = call_with(lambda_returns, available, advantage_args)
    tensors.adv_B_T = per_token(call_with(objectives.advantage, available, advantage_args), mask_B_T)
    return tensors, kl_B_T
