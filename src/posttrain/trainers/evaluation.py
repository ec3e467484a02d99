"""Held-out evaluation: greedy accuracy and sampled pass@k of a model on prompts with answers.

A completion counts as correct when the configured reward scores it >= 1 (the built-in verifiers return
1.0 or 0.0). pass@k uses the unbiased estimator of Chen et al. 2021 (arXiv:2107.03374, Eq. 1) over
`samples` >= k completions per prompt.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posttrain.config import ConfigError
from posttrain.config.sections import EvalSection
from posttrain.data.encoding import PromptTokens
from posttrain.data.errors import DataError
from posttrain.envs import EpisodeLimits, sample_episodes
from posttrain.envs.registry import EnvironmentMix
from posttrain.envs.sampling import NO_LIMITS, EnvironmentFactory, as_mix
from posttrain.envs.single_turn import SingleTurnEnv
from posttrain.rewards import load_reward_fn
from posttrain.rewards.inputs import (
    RewardLog,
    reward_completions,
    reward_prompts,
    row_columns,
    trainer_state,
    trl_reward_kwargs,
)
from posttrain.rollout import ENGINES, SamplingParams
from posttrain.runtime.device import limit_cpu_threads, resolve_device
from posttrain.runtime.logging import track
from posttrain.runtime.seeding import seed_everything
from posttrain.trainers.build import build_policy, check_environment
from posttrain.trainers.splits import load_prompts

RewardFn = Callable[..., list[float]]


@dataclass
class EvalResult:
    num_prompts: int
    greedy_accuracy: float
    pass_at_k: dict[int, float] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    """Per prompt: prompt text, answer, greedy completion, correct (None where the reward does not apply)."""
    episodes: dict[str, float] = field(default_factory=dict)
    """Per-episode means of the greedy episodes' counts (`turns`, `tool_calls`, ...) in a multi-turn environment."""

    def metrics(self) -> dict[str, float]:
        """accuracy, pass@k, how many prompts they are over (`examples`, for their noise), and the greedy episodes'
        counts in a multi-turn environment."""
        passes = {f"pass@{k}": v for k, v in self.pass_at_k.items()}
        return {"accuracy": self.greedy_accuracy, **passes, "examples": float(self.num_prompts), **self.episodes}


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k): the chance that k of the n samples hold at least one correct one (Chen et al.
    2021, arXiv:2107.03374, the unbiased estimator). Needs 1 <= k <= n."""
    if not 1 <= k <= num_samples:
        raise ValueError(f"pass@k: k={k} needs 1 <= k <= the {num_samples} samples")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


@torch.inference_mode()
def evaluate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[PromptTokens],
    reward: RewardFn,
    *,
    max_new_tokens: int = 16,
    samples: int = 1,
    k: int = 1,
    temperature: float = 1.0,
    batch_size: int = 64,
    engine: str = "native",
    generator: torch.Generator | None = None,
    environment: EnvironmentFactory | EnvironmentMix = SingleTurnEnv,
    limits: EpisodeLimits = NO_LIMITS,
) -> EvalResult:
    """Greedy accuracy over `prompts` and, when samples > 1, pass@1..k from sampled completions. A prompt whose
    reward does not apply (None: a verifier's row without a gold answer) is left out of both, as a reward's mean
    leaves it out in training. Episodes are played in `environment` (single-turn by default); in a multi-turn one
    the result also holds the greedy episodes' mean turns, tool calls and the like (`EvalResult.episodes`)."""
    was_training = model.training
    model.eval()
    stop = (tokenizer.eos_token_id,)
    greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=stop)
    sampled = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, stop_token_ids=stop)
    examples, correct_counts, stats = [], [], {}
    play = {"environment": environment, "limits": limits}
    starts = range(0, len(prompts), batch_size)
    for start in track(starts, f"held-out generation, {len(prompts)} prompts", unit="batches"):
        batch = list(prompts[start : start + batch_size])
        greedy_correct, texts, rollouts = _generate_and_score(model, tokenizer, batch, reward, greedy, 1, engine,
                                                              generator, **play)  # fmt: skip
        for key, value in rollouts.stats.items():
            stats[key] = stats.get(key, 0.0) + value
        examples += [
            {
                **_plain_columns(p.extra),  # first: a row's own "completion" must not hide the generated one
                "where": p.where,
                "prompt": tokenizer.decode(p.prompt_ids, skip_special_tokens=True),
                "completion": text,
                "correct": ok,
                **_counts(info),
            }
            for p, text, ok, info in zip(batch, texts, greedy_correct, rollouts.infos)
        ]
        if samples > 1:
            sample_correct, _, _ = _generate_and_score(
                model, tokenizer, batch, reward, sampled, samples, engine, generator, **play
            )
            per_prompt = (sample_correct[i * samples : (i + 1) * samples] for i in range(len(batch)))
            correct_counts += [_correct_count(correct) for correct in per_prompt]
    model.train(was_training)
    applicable = [e["correct"] for e in examples if e["correct"] is not None]
    accuracy = sum(applicable) / max(1, len(applicable))
    result = EvalResult(num_prompts=len(examples), greedy_accuracy=accuracy, examples=examples)
    if not as_mix(environment).single_turn:
        count = max(1.0, stats.get("episodes/count", 0.0))
        result.episodes = {key.removeprefix("episodes/"): value / count for key, value in stats.items()
                           if key.startswith("episodes/") and key != "episodes/count"}  # fmt: skip
    counted = [c for c in correct_counts if c is not None]
    if samples > 1 and counted:
        result.pass_at_k = {j: sum(pass_at_k(samples, c, j) for c in counted) / len(counted) for j in range(1, k + 1)}
    return result



def evaluate_with(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[PromptTokens],
    reward: RewardFn,
    section: EvalSection,
    *,
    generator: torch.Generator | None = None,
    environment: EnvironmentFactory | EnvironmentMix = SingleTurnEnv,
    limits: EpisodeLimits = NO_LIMITS,
) -> EvalResult:
    """`evaluate` with the settings of a config's `eval` section (the one place that reads them)."""
    return evaluate(
        model,
        tokenizer,
        prompts,
        reward,
        max_new_tokens=section.max_new_tokens,
        samples=section.samples,
        k=section.k,
        temperature=section.temperature,
        batch_size=section.batch_size,
        generator=generator,
        environment=environment,
        limits=limits,
    )

def _generate_and_score(
    model: Any,
    tokenizer: Any,
    batch: list[PromptTokens],
    reward: RewardFn,
    params: SamplingParams,
    n: int,
    engine: str,
    generator: torch.Generator | None,
    *,
    environment: EnvironmentFactory | EnvironmentMix,
    limits: EpisodeLimits,
) -> tuple[list[bool | None], list[str], Any]:
    envs: list[Any] = []
    rollouts = sample_episodes(ENGINES[engine], model, batch, params, n=n, generator=generator, tokenizer=tokenizer,
                               environment=environment, limits=limits, envs_out=envs)  # fmt: skip
    texts = tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
    prompts_N = reward_prompts(batch, tokenizer, n)
    messages = [info.get("messages") for info in rollouts.infos]
    completions = messages if all(m is not None for m in messages) else reward_completions(prompts_N, texts)
    single_turn = as_mix(environment).single_turn
    scores = reward(
        prompts=prompts_N,
        completions=completions,
        completion_ids=rollouts.completion_ids,
        **row_columns(batch, n),
        **trl_reward_kwargs(trainer_state(0, 0), RewardLog()),
        **({} if single_turn else {"environments": envs}),
    )
    return [None if s is None else s >= 1.0 for s in scores], texts, rollouts


def _correct_count(correct: list[bool | None]) -> int | None:
    """How many of a prompt's samples are correct; None when the reward applies to none of them."""
    applicable = [c for c in correct if c is not None]
    return sum(applicable) if applicable else None


def _counts(info: dict[str, Any]) -> dict[str, Any]:
    """An episode's numeric info (tool calls, errors, ...) and its messages, for the examples of eval.json."""
    counts = {k: v for k, v in info.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return counts | ({"messages": info["messages"]} if "messages" in info else {})


def _plain_columns(extra: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in extra.items() if isinstance(v, str | int | float | bool)}


def run_evaluation(
    cfg: Any, *, model: Any = None, tokenizer: Any = None, rows: Any = None, reward: RewardFn | None = None
) -> EvalResult:
    """`posttrain eval`: evaluate cfg.model on data.eval (or the task's held-out split); writes eval.json."""
    check_environment()  # as start_run does for training
    limit_cpu_threads()
    generator = seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    model, tokenizer = build_policy(
        cfg.model, seed=cfg.seed, device=device, recipe_dir=cfg.recipe_dir, model=model, tokenizer=tokenizer
    )
    prompts, report = load_prompts(
        cfg.data, tokenizer, "eval", seed=cfg.seed, recipe_dir=cfg.recipe_dir, rows=rows, limit=cfg.eval.limit
    )
    if report is None:
        raise ConfigError("data: set data.eval (a file with prompt and answer) or data.task, or pass rows= from "
                          "Python")  # fmt: skip
    missing = [p.where for p in prompts if "answer" not in p.extra]
    if missing:
        raise DataError(
            f"{missing[0]}: eval rows need an 'answer' field ({len(missing)} rows lack one)",
            reason="missing field",
        )
    reward = reward or load_reward_fn(cfg.eval.reward, base_dir=cfg.recipe_dir)
    result = evaluate_with(model, tokenizer, prompts, reward, cfg.eval, generator=generator)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(
        json.dumps(
            {
                "metrics": result.metrics(),
                "num_prompts": result.num_prompts,
                "data": report.summary(),
                "examples": result.examples,
            },
            indent=1,
        )
    )
    return result
