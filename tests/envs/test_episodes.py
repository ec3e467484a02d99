"""The episode driver: single-turn is one engine call; multi-turn carries ids and masks environment tokens."""

from typing import Any

import pytest
import torch

from posttrain.envs import SingleTurnEnv, StepResult, run_episodes
from posttrain.rollout import ENGINES, Rollouts, SamplingParams

TOOL_IDS = [60, 61, 62]
GREEDY4 = SamplingParams(max_new_tokens=4, temperature=0.0)
ROWS = [{"prompt_ids": [1, 2, 3]}, {"prompt_ids": [4, 5]}]


class CountingEngine:
    """Wraps an engine and records every call's prompts and n."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls = inner, []

    def generate(self, model, prompt_ids, params, *, n, generator=None, tokenizer=None) -> Rollouts:
        self.calls.append(([list(p) for p in prompt_ids], n))
        return self.inner.generate(model, prompt_ids, params, n=n, generator=generator, tokenizer=tokenizer)


class ToolEnv:
    """Replies with TOOL_IDS after each model turn; done after `turns` model turns (never, if None)."""

    def __init__(self, turns: int | None) -> None:
        self.turns, self.seen = turns, []

    def reset(self, row: dict[str, Any]) -> list[int]:
        return list(row["prompt_ids"])

    def step(self, completion_ids: list[int]) -> StepResult:
        self.seen.append(list(completion_ids))
        done = self.turns is not None and len(self.seen) == self.turns
        return StepResult(observation_ids=TOOL_IDS, done=done, info={"turns": len(self.seen)})


def fresh_logprobs(model, padded) -> torch.Tensor:
    """Column t: log p(token t | tokens < t) = log_softmax(logits_{t-1})[token t], one forward. [B, T]."""
    with torch.no_grad():
        logits_B_T_V = model(
            input_ids=padded.input_ids_B_T, attention_mask=padded.attention_mask_B_T.long()
        ).logits
    next_B_T = logits_B_T_V.float().log_softmax(-1).gather(-1, padded.input_ids_B_T.roll(-1, dims=1)[..., None])
    return next_B_T.squeeze(-1).roll(1, dims=1)  # shift so column t holds the log-prob of token t


def test_single_turn_is_exactly_one_engine_call(tiny_qwen2):
    engine = CountingEngine(ENGINES["native"])
    envs = [SingleTurnEnv() for _ in range(4)]
    out = run_episodes(engine, tiny_qwen2, envs, ROWS, GREEDY4, n=2)
    assert engine.calls == [([[1, 2, 3], [4, 5]], 2)]
    direct = ENGINES["native"].generate(tiny_qwen2, [[1, 2, 3], [4, 5]], GREEDY4, n=2)
    assert out.completion_ids == direct.completion_ids
    assert all(m.all() for m in out.model_token_mask)
    assert out.infos == [{}] * 4


def test_multi_turn_appends_tool_ids_and_masks_them(tiny_qwen2):
    engine = CountingEngine(ENGINES["native"])
    # row 0's episodes end after 2 model turns, row 1's after 1
    envs = [ToolEnv(2), ToolEnv(2), ToolEnv(1), ToolEnv(1)]
    out = run_episodes(engine, tiny_qwen2, envs, ROWS, GREEDY4, n=2)

    # turn 1: one grouped call; turn 2: only row 0's two episodes, each with its own full context
    first = ENGINES["native"].generate(tiny_qwen2, [[1, 2, 3], [4, 5]], GREEDY4, n=2).completion_ids
    assert engine.calls[0] == ([[1, 2, 3], [4, 5]], 2)
    assert engine.calls[1] == ([[1, 2, 3] + first[0] + TOOL_IDS, [1, 2, 3] + first[1] + TOOL_IDS], 1)
    assert len(engine.calls) == 2

    # two-turn episodes: 4 model + 3 tool + 4 model tokens; one-turn episodes: 4 model tokens
    assert [len(c) for c in out.completion_ids] == [11, 11, 4, 4]
    assert out.completion_ids[0][4:7] == TOOL_IDS
    two_turn_mask = [True] * 4 + [False] * 3 + [True] * 4
    assert out.model_token_mask[0].tolist() == out.model_token_mask[1].tolist() == two_turn_mask
    assert out.model_token_mask[2].tolist() == [True] * 4
    assert out.logprobs[0][4:7].tolist() == [0.0, 0.0, 0.0]
    assert envs[0].seen == [first[0], out.completion_ids[0][7:]]  # the env saw each model turn's ids only
    assert [info["turns"] for info in out.infos] == [2, 2, 1, 1]
    assert out.num_model_tokens == 8 + 8 + 4 + 4

    # the training layout's old log-probs equal a fresh forward on model tokens (greedy: T = 1)
    padded = out.to_padded(pad_id=0)
    fresh_B_T = fresh_logprobs(tiny_qwen2, padded)
    mask = padded.loss_mask_B_T
    assert mask.sum().item() == 24
    torch.testing.assert_close(padded.old_logp_B_T[mask], fresh_B_T[mask], atol=1e-4, rtol=0)


def test_max_turns_cuts_an_unfinished_episode_with_reason_length(tiny_qwen2):
    envs = [ToolEnv(None), ToolEnv(None)]
    out = run_episodes(ENGINES["native"], tiny_qwen2, envs, ROWS[:1], GREEDY4, n=2, max_turns=3)
    # 3 model turns of 4 tokens with 2 tool replies between them; the last reply is not appended
    assert (
        out.model_token_mask[0].tolist() == [True] * 4 + [False] * 3 + [True] * 4 + [False] * 3 + [True] * 4
    )
    assert out.finish_reasons == ["length", "length"]
    assert len(envs[0].seen) == 3


def test_a_group_must_share_its_prompt(tiny_qwen2):
    class OffsetEnv(SingleTurnEnv):
        def __init__(self, offset: int) -> None:
            super().__init__()
            self.offset = offset

        def reset(self, row: dict[str, Any]) -> list[int]:
            return [t + self.offset for t in super().reset(row)]

    with pytest.raises(ValueError, match="episode 1 of row 0 reset to a different prompt"):
        run_episodes(ENGINES["native"], tiny_qwen2, [OffsetEnv(0), OffsetEnv(1)], ROWS[:1], GREEDY4, n=2)
    with pytest.raises(ValueError, match="got 3 environments for 2 rows x n=2"):
        run_episodes(ENGINES["native"], tiny_qwen2, [SingleTurnEnv()] * 3, ROWS, GREEDY4, n=2)


def test_single_turn_env_names_a_missing_field():
    with pytest.raises(KeyError, match="no field 'prompt_ids'"):
        SingleTurnEnv().reset({"prompt": "hi"})
