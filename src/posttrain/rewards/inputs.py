"""What a reward function is called with: the arguments TRL's `GRPOTrainer` passes, built from a step's prompts and
sampled completions, so that a TRL user's reward function works unchanged.

    prompts         the rows' prompts as written: strings, or conversations (lists of {role, content})
    completions     strings for text prompts; for a conversation, [{"role": "assistant", "content": text}]; for a
                    multi-turn episode, the messages its environment reports after the prompt (tool calls, tool
                    results, the final answer), as TRL's tool loop passes them
    completion_ids  the sampled token ids
    trainer_state   a transformers `TrainerState` (global_step, max_steps, epoch) for schedules in the reward
    log_metric      log_metric(name, value): a scalar logged with the step's metrics (`rewards/logged/<name>`)
    log_extra       log_extra(column, values): a column beside the step's sampled completions
    environments    the episodes' environments, one per completion (only when they are not single-turn)
    **columns       every other column of the rows (`answer`, ...), one value per completion

TRL leaves the rows' `prompt`, `completion` and `completion_ids` columns out of the columns; so does posttrain.

`sample_table` turns a step's prompts, completions and scores into the rows of the sampled-completions table
(samples.jsonl, and the trackers' tables), as TRL's completions table shows them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from posttrain.data.encoding import PromptTokens
from posttrain.rewards.scoring import RewardResult, RewardSet

NOT_COLUMNS = frozenset({"prompt", "completion", "completion_ids", "completions"})
"""Row fields never passed as columns: the samples themselves (a listwise row's `completions` would collide with the
reward's own `completions`)."""


def is_conversation(content: Any) -> bool:
    return isinstance(content, list) and all(isinstance(m, Mapping) for m in content)


def reward_prompts(prompts: Sequence[PromptTokens], tokenizer: Any, n: int) -> list[Any]:
    """Each prompt as its row wrote it, repeated for its n completions (decoded ids where no row text is kept)."""
    written = [p.prompt if p.prompt is not None else tokenizer.decode(p.prompt_ids, skip_special_tokens=True)
               for p in prompts]  # fmt: skip
    return [prompt for prompt in written for _ in range(n)]


def reward_completions(prompts_N: Sequence[Any], texts_N: Sequence[str]) -> list[Any]:
    """Completions as TRL passes them: the text, or after a conversation one assistant message holding it."""
    return [[{"role": "assistant", "content": text}] if is_conversation(prompt) else text
            for prompt, text in zip(prompts_N, texts_N, strict=True)]  # fmt: skip


def row_columns(prompts: Sequence[PromptTokens], n: int) -> dict[str, list[Any]]:
    """The rows' other columns, one value per completion (None where a row lacks the column)."""
    keys = sorted({key for p in prompts for key in p.extra} - NOT_COLUMNS)
    return {key: [p.extra.get(key) for p in prompts for _ in range(n)] for key in keys}


@dataclass
class RewardLog:
    """What reward functions logged through `log_metric` and `log_extra` during one step's scoring."""

    metrics: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    columns: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))

    def log_metric(self, name: str, value: float) -> None:
        self.metrics[name].append(float(value))

    def log_extra(self, column: str, values: list[Any]) -> None:
        self.columns[column].extend(values)

    def means(self) -> dict[str, float]:
        return {f"rewards/logged/{name}": sum(values) / len(values) for name, values in self.metrics.items() if values}


def trl_reward_kwargs(trainer_state: Any, log: RewardLog) -> dict[str, Any]:
    """The keyword arguments TRL passes every reward function beside the samples and columns."""
    return {"trainer_state": trainer_state, "log_metric": log.log_metric, "log_extra": log.log_extra}


def trainer_state(step: int, max_steps: int, epoch: float = 0.0) -> Any:
    """A transformers `TrainerState` at `step` of `max_steps`, as TRL hands it to reward functions."""
    from transformers import TrainerState

    return TrainerState(global_step=step, max_steps=max_steps, epoch=epoch)


def score_completions(
    reward_set: RewardSet,
    tokenizer: Any,
    prompts: list[PromptTokens],
    completion_ids: list[list[int]],
    n: int,
    extra_kwargs: dict[str, Any] | None = None,
    *,
    completions: list[Any] | None = None,
) -> RewardResult:
    """Decode and score P*n completions, each prompt's n contiguous, calling the rewards as TRL does
    (`rewards.inputs`): the prompts as written, conversational completions as messages, each row's columns
    (`answer`, ...), and `extra_kwargs` (`trainer_state`, `log_metric`, `log_extra`, `environments`).
    `completions`: what the rewards receive instead of the decoded ids (a multi-turn episode's messages)."""
    prompts_N = reward_prompts(prompts, tokenizer, n)
    if completions is None:
        texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        completions = reward_completions(prompts_N, texts)
    return reward_set.score(prompts_N, completions, completion_ids, row_columns(prompts, n),
                            extra_kwargs=extra_kwargs)  # fmt: skip


def sample_table(
    tokenizer: Any,
    prompts: Sequence[PromptTokens],
    completion_ids: Sequence[Sequence[int]],
    n: int,
    rewards: RewardResult,
    logged: Mapping[str, Sequence[Any]] | None = None,
) -> list[dict[str, Any]]:
    """One row per completion (prompt i owns completions i*n .. i*n + n - 1): the prompt
    and completion as text, the weighted total (`reward`), each reward's raw score (`reward/<name>`; None where it
    did not apply), the completion's token count, and the columns reward functions logged with `log_extra` this
    step. A logged column of another length than the step's completions (several draws under dynamic sampling) is
    left out: its values cannot be matched to these completions."""
    prompts_N = reward_prompts(prompts, tokenizer, n)
    texts = tokenizer.batch_decode(list(completion_ids), skip_special_tokens=True)
    matched = {k: v for k, v in (logged or {}).items() if len(v) == len(completion_ids)}
    rows = []
    for i in range(len(completion_ids)):
        row: dict[str, Any] = {"prompt": as_text(prompts_N[i]), "completion": texts[i],
                               "reward": rewards.total[i].item()}  # fmt: skip
        for name, scores_N in rewards.per_reward.items():
            score = scores_N[i].item()
            row[f"reward/{name}"] = None if score != score else score  # NaN: not applicable
        row["tokens"] = len(completion_ids[i])
        rows.append(row | {column: values[i] for column, values in matched.items()})
    return rows


def as_text(content: Any) -> str:
    """A prompt as one string: text as it is, a conversation as `role: content` lines."""
    if is_conversation(content):
        return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in content)
    return str(content)
