"""The environment protocol and the episode driver that runs engines against environments.

An episode: `reset(row)` gives the prompt ids; the model answers (one engine call); `step(answer_ids)`
returns the environment's reply as token ids and whether the episode is done. Until done (or
`max_turns` model turns), the reply is appended to the context and the model answers again. Tokens
are carried as ids throughout: text is never re-tokenised, so what the model saw is exactly what the
trainer scores. Environment tokens are in the completion but masked out of the loss
(`Rollouts.model_token_mask` False, log-prob 0.0).
"""

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from posttrain.rollout.engine import Engine, FinishReason, Rollouts, SamplingParams


@dataclass
class StepResult:
    """What an environment returns after a model turn."""

    observation_ids: list[int]
    """Token ids appended to the context before the next model turn (tool output); [] when none."""
    done: bool
    """True when the episode is over."""
    info: dict[str, Any] = field(default_factory=dict)
    """Anything a reward needs (tool results, final answer, ...); the last step's info is kept."""


class Environment(Protocol):
    """One episode's state. The driver uses one instance per episode (P*G of them)."""

    def reset(self, row: dict[str, Any]) -> list[int]:
        """Start an episode for a data row; return its prompt token ids."""
        ...

    def step(self, completion_ids: list[int]) -> StepResult:
        """Take the model's latest turn (its token ids only) and reply."""
        ...


@dataclass
class _Episode:
    """Growing completion of one episode: tokens, log-probs and the model-token mask, turn by turn."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[torch.Tensor] = field(default_factory=list)
    masks: list[torch.Tensor] = field(default_factory=list)
    finish_reason: FinishReason = "length"
    info: dict[str, Any] = field(default_factory=dict)

    def add_model_turn(self, ids: list[int], logp: torch.Tensor, reason: FinishReason) -> None:
        self.tokens += ids
        self.logprobs.append(logp)
        self.masks.append(torch.ones(len(ids), dtype=torch.bool))
        self.finish_reason = reason

    def add_observation(self, ids: list[int], device: torch.device) -> None:
        self.tokens += ids
        self.logprobs.append(torch.zeros(len(ids), dtype=torch.float32, device=device))
        self.masks.append(torch.zeros(len(ids), dtype=torch.bool))


def reset_groups(envs: list[Environment], rows: list[dict[str, Any]], n: int) -> list[list[int]]:
    """Reset every episode (env i plays row i // n); return the P prompts. A group must share its prompt."""
    if len(envs) != len(rows) * n:
        raise ValueError(
            f"run_episodes: got {len(envs)} environments for {len(rows)} rows x n={n}; need one per episode"
        )
    prompts_PG = [env.reset(rows[i // n]) for i, env in enumerate(envs)]
    for i, prompt in enumerate(prompts_PG):
        if prompt != prompts_PG[i - i % n]:
            raise ValueError(
                f"run_episodes: episode {i} of row {i // n} reset to a different prompt than its group"
            )
    return prompts_PG[::n]


def run_episodes(
    engine: Engine,
    model: Any,
    envs: list[Environment],
    rows: list[dict[str, Any]],
    params: SamplingParams,
    *,
    n: int,
    generator: torch.Generator | None = None,
    tokenizer: Any = None,
    max_turns: int = 8,
) -> Rollouts:
    """Play P*G episodes (env i on rows[i // n]) and return them as Rollouts with group_size n.

    The first turn is one engine call over the P prompts with n samples each (the group shares its
    prefill). If every environment is done after it (single-turn), that call's Rollouts are returned
    as they are, with the infos attached. Otherwise the unfinished episodes continue, one engine call
    per turn over their full contexts (n=1), until done or `max_turns` model turns; an episode cut
    off by `max_turns` gets finish reason "length". The observation of the final step is not appended.
    """
    prompts_P = reset_groups(envs, rows, n)
    first = engine.generate(model, prompts_P, params, n=n, generator=generator, tokenizer=tokenizer)
    results = [env.step(ids) for env, ids in zip(envs, first.completion_ids)]
    if all(r.done for r in results):
        first.infos = [r.info for r in results]
        return first

    device = first.logprobs[0].device if first.logprobs else torch.device("cpu")
    episodes = [_Episode(prompt=prompts_P[i // n]) for i in range(len(envs))]
    turn = [
        (i, first.completion_ids[i], first.logprobs[i], first.finish_reasons[i]) for i in range(len(envs))
    ]
    for turn_index in range(1, max_turns + 1):
        if turn_index > 1:
            results = [envs[i].step(ids) for i, ids, _, _ in turn]
        active = []
        for (i, ids, logp, reason), result in zip(turn, results):
            episodes[i].add_model_turn(ids, logp, reason)
            episodes[i].info = result.info
            if result.done:
                continue
            if turn_index == max_turns:
                episodes[i].finish_reason = "length"
                continue
            episodes[i].add_observation(result.observation_ids, device)
            active.append(i)
        if not active:
            break
        contexts = [episodes[i].prompt + episodes[i].tokens for i in active]
        step = engine.generate(model, contexts, params, n=1, generator=generator, tokenizer=tokenizer)
        turn = list(zip(active, step.completion_ids, step.logprobs, step.finish_reasons))

    return Rollouts(
        prompt_ids=prompts_P,
        completion_ids=[e.tokens for e in episodes],
        logprobs=[torch.cat(e.logprobs) for e in episodes],
        finish_reasons=[e.finish_reason for e in episodes],
        group_size=n,
        model_token_mask=[torch.cat(e.masks) for e in episodes],
        infos=[e.info for e in episodes],
    )
