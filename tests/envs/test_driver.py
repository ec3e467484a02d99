"""The episode driver with scripted policies: limits, failures, per-turn rewards, split episodes, concurrency."""

import threading
import time
from typing import Any

import torch
from tests.envs.scripted import NoModel, ScriptedEngine

from posttrain.envs import StepResult, run_episodes
from posttrain.rollout import SamplingParams

PARAMS = SamplingParams(max_new_tokens=8, temperature=1.0)
ROW = [{"prompt_ids": [1, 2]}]


class Replies:
    """Replies `obs` after each turn; done after `turns`; raises on turn `raise_on`; per-turn `rewards`; a new
    context (a split) after turn `split_after`."""

    def __init__(self, turns=3, obs=(9,), raise_on=None, rewards=None, split_after=None, sleep_s=0.0):
        self.turns, self.obs, self.raise_on, self.rewards = turns, list(obs), raise_on, rewards
        self.split_after, self.sleep_s, self.seen = split_after, sleep_s, 0

    def reset(self, row: dict[str, Any]) -> list[int]:
        return list(row["prompt_ids"])

    def step(self, completion_ids: list[int]) -> StepResult:
        time.sleep(self.sleep_s)
        self.seen += 1
        if self.seen == self.raise_on:
            raise RuntimeError("the tool server is down")
        reward = None if self.rewards is None else self.rewards[self.seen - 1]
        context = [1, 2, 50, 51] if self.seen == self.split_after else None
        return StepResult(self.obs, done=self.seen == self.turns, info={"calls": self.seen}, reward=reward,
                          context_ids=context)


def play(envs, reply=lambda context: [5, 6], **kwargs):
    engine = ScriptedEngine(reply)
    return run_episodes(engine, NoModel(), envs, ROW, PARAMS, n=len(envs), **kwargs), engine


def test_max_total_tokens_cuts_the_episode_within_the_sampled_ids():
    # turns of 2 model tokens + 1 env token; a limit of 5 after the prompt: [5, 6, 9, 5, 6] then no room for 9
    out, _ = play([Replies(turns=10)], max_total_tokens=5)
    assert out.completion_ids == [[5, 6, 9, 5, 6]]
    assert out.finish_reasons == ["length"] and out.stats["episodes/truncated"] == 1
    # a limit inside a model turn keeps the sampled prefix, with its own log-probs
    out, _ = play([Replies(turns=10)], max_total_tokens=4)
    assert out.completion_ids == [[5, 6, 9, 5]] and out.logprobs[0].tolist() == [-0.5, -0.5, 0.0, -0.5]


def test_an_environment_that_raises_fails_its_episode_only_and_is_counted():
    out, _ = play([Replies(turns=3, raise_on=2), Replies(turns=3)])
    assert out.infos[0]["env_error"] == "RuntimeError: the tool server is down"
    assert out.completion_ids[0] == [5, 6, 9, 5, 6] and out.completion_ids[1] == [5, 6, 9, 5, 6, 9, 5, 6]
    assert out.stats["episodes/failed"] == 1 and out.stats["episodes/turns"] == 2 + 3


def test_per_turn_rewards_sit_on_each_turns_last_token():
    out, _ = play([Replies(turns=2, rewards=[0.5, 2.0])])
    # completion [5, 6, 9, 5, 6]: turn 0 ends at position 1, turn 1 at position 4
    assert out.step_rewards == [[(1, 0.5), (4, 2.0)]]
    assert out.env_rewards() == [2.5]
    assert out.turn_ids[0].tolist() == [0, 0, -1, 1, 1]


def test_a_new_context_splits_the_episode_into_two_training_samples():
    out, engine = play([Replies(turns=2, split_after=1)])
    # the second turn was sampled after the new context, not after prompt + first turn
    assert engine.calls[1] == [[1, 2, 50, 51]]
    assert out.completion_ids == [[5, 6, 5, 6]] and out.segments == [[(2, [1, 2, 50, 51])]]
    assert out.stats["episodes/split"] == 1 and out.stats["episodes/extra_samples"] == 1
    rows, layout = out.to_training_rows(pad_id=0)
    # row 0: prompt [1, 2] + [5, 6]; row 1: context [1, 2, 50, 51] + [5, 6]; each trains its own sampled ids
    assert rows.input_ids_B_T.tolist() == [[1, 2, 5, 6, 0, 0], [1, 2, 50, 51, 5, 6]]
    assert rows.loss_mask_B_T.tolist() == [[False, False, True, True, False, False],
                                           [False, False, False, False, True, True]]
    assert layout.episode_of_B.tolist() == [0, 0]
    # the episode layout is prompt + the whole stream; a per-token value goes there and back unchanged
    x_B_T = torch.arange(12.0).view(2, 6)
    x_E_T = layout.to_episodes(x_B_T)
    assert x_E_T.tolist() == [[0.0, 0.0, 2.0, 3.0, 10.0, 11.0]]
    torch.testing.assert_close(layout.to_rows(x_E_T, (2, 6)), x_B_T * rows.loss_mask_B_T)


def test_slow_environment_steps_of_a_turn_run_concurrently():
    # 8 episodes whose steps each sleep 0.2 s: concurrent, a turn's steps overlap (serial would be >= 1.6 s a turn)
    overlapping = {"now": 0, "most": 0}
    lock = threading.Lock()

    class Slow(Replies):
        def step(self, completion_ids):
            with lock:
                overlapping["now"] += 1
                overlapping["most"] = max(overlapping["most"], overlapping["now"])
            try:
                return super().step(completion_ids)
            finally:
                with lock:
                    overlapping["now"] -= 1

    out, _ = play([Slow(turns=2, sleep_s=0.2) for _ in range(8)])
    assert overlapping["most"] > 1
    assert out.stats["time/env_s"] > 0 and out.stats["time/gen_s"] >= 0
