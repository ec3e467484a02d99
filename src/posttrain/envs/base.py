"""The environment protocol and the episode driver that runs engines against environments.

An episode: `reset(row)` gives the prompt ids; the model answers (one engine call); `step(answer_ids)`
returns the environment's reply as token ids, an optional reward for the turn, and whether the episode is done.
Until done (or `max_turns` model turns, or `max_total_tokens` after the prompt), the reply is appended to the
context and the model answers again. Tokens are carried as ids throughout: text is never re-tokenised, so what
the model saw is exactly what the trainer scores. Environment tokens are in the completion but masked out of the
loss (`Rollouts.model_token_mask` False, log-prob 0.0).

An environment that cannot extend the context token-exactly (a chat template that re-renders earlier turns
differently from what was sampled) returns `context_ids`, the whole context of the next turn, instead of
`observation_ids`: the episode is then split there into another training sample (`Rollouts.segments`), never
trained on ids that were not the ones sampled.

Episodes of one step advance together: one engine call per turn over every unfinished episode, and the
environments' steps of a turn run concurrently (`step_all`), so a slow tool does not serialise the batch.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from posttrain.rollout.engine import Engine, FinishReason, Rollouts, SamplingParams

MAX_STEP_THREADS = 32
"""Most environment steps run at once: a turn's tool calls wait on I/O or subprocesses, not on this process."""


@dataclass
class StepResult:
    """What an environment returns after a model turn."""

    observation_ids: list[int]
    """Token ids appended to the context before the next model turn (tool output); [] when none."""
    done: bool
    """True when the episode is over."""
    info: dict[str, Any] = field(default_factory=dict)
    """Anything a reward needs (tool results, final answer, ...); the last step's info is kept. Numeric entries
    are averaged over the step's episodes into the metrics (`episodes/<key>`); `messages` (the episode's messages
    after the prompt) is what reward functions receive as the completion."""
    reward: float | None = None
    """This turn's reward from the environment (a game's score), placed on the turn's last model token and added
    to the episode's return; None: the environment gives none."""
    context_ids: list[int] | None = None
    """The whole context of the next model turn, when it is not the context so far extended by observation ids:
    the episode is split here into another training sample (observation_ids is then ignored)."""


class Environment(Protocol):
    """One episode's state. The driver uses one instance per episode (P*G of them)."""

    def reset(self, row: dict[str, Any]) -> list[int]:
        """Start an episode for a data row; return its prompt token ids."""
        ...

    def step(self, completion_ids: list[int]) -> StepResult:
        """Take the model's latest turn (its token ids only) and reply."""
        ...

    # An environment may also define `close()`: the driver calls it once the episode is over, however it ended (an
    # agent's environment answers the call its agent still waits on, `agents.env`).


@dataclass
class _Episode:
    """Growing completion of one episode: tokens, log-probs, the model-token mask and turn ids, turn by turn."""

    context: list[int]
    """What the next model turn is sampled after: the current segment's context and its tokens so far."""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[torch.Tensor] = field(default_factory=list)
    masks: list[torch.Tensor] = field(default_factory=list)
    turns: list[torch.Tensor] = field(default_factory=list)
    step_rewards: list[tuple[int, float]] = field(default_factory=list)
    segments: list[tuple[int, list[int]]] = field(default_factory=list)
    finish_reason: FinishReason = "length"
    info: dict[str, Any] = field(default_factory=dict)
    num_turns: int = 0
    failed: bool = False

    def add_model_turn(self, ids: list[int], logp: torch.Tensor, reason: FinishReason) -> None:
        self.tokens += ids
        self.context += ids
        self.logprobs.append(logp)
        self.masks.append(torch.ones(len(ids), dtype=torch.bool))
        self.turns.append(torch.full((len(ids),), self.num_turns, dtype=torch.long))
        self.finish_reason = reason
        self.num_turns += 1

    def add_reward(self, reward: float) -> None:
        """At the last token of the latest model turn (the turn's first position when it was empty)."""
        self.step_rewards.append((max(0, len(self.tokens) - 1), float(reward)))

    def add_observation(self, ids: list[int], device: torch.device) -> None:
        self.tokens += ids
        self.context += ids
        self.logprobs.append(torch.zeros(len(ids), dtype=torch.float32, device=device))
        self.masks.append(torch.zeros(len(ids), dtype=torch.bool))
        self.turns.append(torch.full((len(ids),), -1, dtype=torch.long))

    def start_segment(self, context: list[int]) -> None:
        self.segments.append((len(self.tokens), list(context)))
        self.context = list(context)


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


def step_all(envs: list[Environment], turns: list[list[int]]) -> list[StepResult | BaseException]:
    """Each environment's step on its model turn, concurrently (threads) unless all are single-turn; an exception
    an environment raises is returned in its place (the episode fails, counted, the step goes on)."""
    from posttrain.envs.single_turn import SingleTurnEnv

    def one(env: Environment, ids: list[int]) -> StepResult | BaseException:
        try:
            return env.step(ids)
        except Exception as error:
            return error

    if len(envs) <= 1 or all(type(env) is SingleTurnEnv for env in envs):
        return [one(env, ids) for env, ids in zip(envs, turns)]
    with ThreadPoolExecutor(max_workers=min(MAX_STEP_THREADS, len(envs)), thread_name_prefix="posttrain-env") as pool:
        return list(pool.map(one, envs, turns))


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
    max_total_tokens: int | None = None,
) -> Rollouts:
    """Play P*G episodes (env i on rows[i // n]) and return them as Rollouts with group_size n.

    The first turn is one engine call over the P prompts with n samples each (the group shares its
    prefill). If every environment is done after it with nothing else to record (single-turn), that call's
    Rollouts are returned as they are, with the infos attached. Otherwise the unfinished episodes continue, one
    engine call per turn over their contexts (n=1), until done, `max_turns` model turns, or `max_total_tokens`
    tokens after the prompt (model and environment tokens). An episode cut off by a limit, or whose last model
    turn reached `params.max_new_tokens`, ends with finish reason "length" and counts as truncated (a turn cut by
    max_new_tokens ends the episode only if its environment says done); one whose environment raised ends there
    and counts as failed (`info["env_error"]`). The observation of the final step is
    not appended. `Rollouts.stats` holds the counts and the time spent generating and in the environments. Every
    environment that has a `close()` is closed at the end, whatever happened.
    """
    try:
        return _play(engine, model, envs, rows, params, n=n, generator=generator, tokenizer=tokenizer,
                     max_turns=max_turns, max_total_tokens=max_total_tokens)  # fmt: skip
    finally:
        close_all(envs)


def close_all(envs: list[Environment]) -> None:
    for env in envs:
        close = getattr(env, "close", None)
        if callable(close):
            close()


def _play(
    engine: Engine,
    model: Any,
    envs: list[Environment],
    rows: list[dict[str, Any]],
    params: SamplingParams,
    *,
    n: int,
    generator: torch.Generator | None,
    tokenizer: Any,
    max_turns: int,
    max_total_tokens: int | None,
) -> Rollouts:
    started = time.perf_counter()
    prompts_P = reset_groups(envs, rows, n)
    first = engine.generate(model, prompts_P, params, n=n, generator=generator, tokenizer=tokenizer)
    generated = time.perf_counter()
    turn = [_within(max_total_tokens, i, ids, logp, reason)
            for i, (ids, logp, reason) in enumerate(zip(first.completion_ids, first.logprobs, first.finish_reasons))]
    results = step_all(envs, [ids for _, ids, _, _ in turn])  # fmt: skip
    gen_s, env_s = generated - started, time.perf_counter() - generated
    if all(_ends_simply(r) for r in results):
        first.completion_ids = [ids for _, ids, _, _ in turn]
        first.logprobs = [logp for _, _, logp, _ in turn]
        first.finish_reasons = [reason for _, _, _, reason in turn]
        first.infos = [r.info for r in results]  # type: ignore[union-attr]
        first.stats = _stats(turns=[1] * len(envs), reasons=first.finish_reasons, failed=0, infos=first.infos,
                             gen_s=gen_s, env_s=env_s)  # fmt: skip
        return first

    device = first.logprobs[0].device if first.logprobs else torch.device("cpu")
    episodes = [_Episode(context=list(prompts_P[i // n])) for i in range(len(envs))]
    for turn_index in range(1, max_turns + 1):
        if turn_index > 1:
            turn = [_within(None if max_total_tokens is None else max_total_tokens - len(episodes[i].tokens),
                            i, ids, logp, reason) for i, ids, logp, reason in turn]  # fmt: skip
            stepped = time.perf_counter()
            results = step_all([envs[i] for i, _, _, _ in turn], [ids for _, ids, _, _ in turn])
            env_s += time.perf_counter() - stepped
        active = []
        for (i, ids, logp, reason), result in zip(turn, results):
            episode = episodes[i]
            episode.add_model_turn(ids, logp, reason)
            if isinstance(result, BaseException):
                episode.failed, episode.info = True, {"env_error": f"{type(result).__name__}: {result}"}
                continue
            episode.info = result.info
            if result.reward is not None:
                episode.add_reward(result.reward)
            if result.done:
                continue
            if turn_index == max_turns:
                episode.finish_reason = "length"
                continue
            if result.context_ids is not None:
                episode.start_segment(result.context_ids)
            elif max_total_tokens is not None and len(episode.tokens) + len(result.observation_ids) >= max_total_tokens:
                episode.finish_reason = "length"  # no room left for a model token after the observation
                continue
            else:
                episode.add_observation(result.observation_ids, device)
            active.append(i)
        if not active:
            break
        contexts = [episodes[i].context for i in active]
        sampling = time.perf_counter()
        step = engine.generate(model, contexts, params, n=1, generator=generator, tokenizer=tokenizer)
        gen_s += time.perf_counter() - sampling
        turn = list(zip(active, step.completion_ids, step.logprobs, step.finish_reasons))

    infos = [e.info for e in episodes]
    return Rollouts(
        prompt_ids=prompts_P,
        completion_ids=[e.tokens for e in episodes],
        logprobs=[torch.cat(e.logprobs) for e in episodes],
        finish_reasons=[e.finish_reason for e in episodes],
        group_size=n,
        model_token_mask=[torch.cat(e.masks) for e in episodes],
        infos=infos,
        turn_ids=[torch.cat(e.turns) for e in episodes],
        step_rewards=[e.step_rewards for e in episodes] if any(e.step_rewards for e in episodes) else [],
        segments=[e.segments for e in episodes] if any(e.segments for e in episodes) else [],
        stats=_stats(
            turns=[e.num_turns for e in episodes], reasons=[e.finish_reason for e in episodes],
            failed=sum(e.failed for e in episodes), infos=infos, split=sum(bool(e.segments) for e in episodes),
            gen_s=gen_s, env_s=env_s, segments=sum(len(e.segments) for e in episodes),
        ),
    )


def _within(room: int | None, i: int, ids: list[int], logp: torch.Tensor, reason: FinishReason) -> tuple:
    """A model turn cut to the `room` left under max_total_tokens (reason "length" when cut): the ids kept are still
    the ones sampled."""
    if room is None or len(ids) <= room:
        return i, ids, logp, reason
    return i, ids[:room], logp[:room], "length"


def _ends_simply(result: StepResult | BaseException) -> bool:
    """Done after one turn with nothing the single-turn Rollouts cannot hold."""
    return isinstance(result, StepResult) and result.done and result.reward is None


def _stats(
    *, turns: list[int], reasons: list[str], failed: int, infos: list[dict[str, Any]], gen_s: float, env_s: float,
    split: int = 0, segments: int = 0,
) -> dict[str, float]:  # fmt: skip
    """Sums over the step's episodes (`episodes/...`: divide by `episodes/count` for means) and times."""
    stats = {
        "episodes/count": float(len(turns)),
        "episodes/turns": float(sum(turns)),
        "episodes/truncated": float(sum(r == "length" for r in reasons)),
        "episodes/failed": float(failed),
        "episodes/split": float(split),
        "episodes/extra_samples": float(segments),
        "time/gen_s": gen_s,
        "time/env_s": env_s,
    }
    for info in infos:
        for key, value in info.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                stats[f"episodes/{key}"] = stats.get(f"episodes/{key}", 0.0) + float(value)
    return stats
