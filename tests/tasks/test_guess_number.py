"""Guess-the-number games as rows: binary search and counting up as the module says, every secret once in the
held-out split, and demonstrations the `guess_number` environment replays message for message."""

import pytest
from tests.envs.scripted import NoModel, TurnScript

from posttrain.config import ConfigError, SFTConfig, load_config
from posttrain.config.pref import FeedbackDataSection
from posttrain.data.encoding import PromptTokens
from posttrain.envs import sample_episodes
from posttrain.envs.games import GuessNumberEnv
from posttrain.rollout import SamplingParams
from posttrain.tasks import GuessNumberTask, build_builtin_tokenizer
from posttrain.trainers.splits import build_task, load_feedback


def guesses(messages):
    return [int(m["content"]) for m in messages if m["role"] == "assistant"]


def test_binary_search_and_counting_up_as_written():
    task = GuessNumberTask(low=1, high=16, max_guesses=5)
    # secret 11: 8 (higher, 9..16) -> 12 (lower, 9..11) -> 10 (higher, 11..11) -> 11
    assert task.game(11, search=True) == [
        {"role": "assistant", "content": "8"}, {"role": "user", "content": "higher"},
        {"role": "assistant", "content": "12"}, {"role": "user", "content": "lower"},
        {"role": "assistant", "content": "10"}, {"role": "user", "content": "higher"},
        {"role": "assistant", "content": "11"},
    ]  # fmt: skip
    assert guesses(task.game(3, search=False)) == [1, 2, 3]
    # binary search finds each of the 16 within 5 guesses; counting up only 1..5, ending on its 5th wrong guess
    assert all(guesses(task.game(s, search=True))[-1] == s for s in range(1, 17))
    assert max(len(guesses(task.game(s, search=True))) for s in range(1, 17)) == 5
    assert [s for s in range(1, 17) if guesses(task.game(s, search=False))[-1] == s] == [1, 2, 3, 4, 5]
    assert guesses(task.game(16, search=False)) == [1, 2, 3, 4, 5]


def test_the_held_out_split_plays_every_secret_in_turn_and_the_share_of_searches_is_seeded():
    task = GuessNumberTask(low=3, high=6, search_fraction=0.25)
    assert [r["secret"] for r in task.sample(6, seed=0, split="eval")] == [3, 4, 5, 6, 3, 4]
    rows = task.sample(2000, seed=0)
    searches = sum(guesses(r["completion"])[0] == 4 for r in rows)  # binary search opens with (3 + 6) // 2 = 4
    assert 0.2 < searches / 2000 < 0.3
    assert rows == task.sample(2000, seed=0) and {r["answer"] for r in rows} == {"3", "4", "5", "6"}


def test_a_demonstration_is_replayed_exactly_by_the_environment():
    tok = build_builtin_tokenizer("arithmetic")
    task = GuessNumberTask()
    row = task.row(11, search=True)
    engine = TurnScript(tok, [m["content"] for m in row["completion"] if m["role"] == "assistant"])
    prompts = [PromptTokens([0], "row 1", {"secret": 11, "answer": "11"}, row["prompt"])]
    out = sample_episodes(engine, NoModel(), prompts, SamplingParams(max_new_tokens=8), n=1, generator=None,
                          tokenizer=tok, environment=lambda: GuessNumberEnv(tok, max_guesses=5))  # fmt: skip
    assert out.infos[0]["messages"] == row["completion"]
    assert out.infos[0]["solved"] == 1 and out.infos[0]["guesses"] == 4
    assert out.step_rewards == [[(len(out.completion_ids[0]) - 1, 1.0)]]


def test_the_task_section_builds_the_game_and_refuses_another_tasks_settings():
    task = {"name": "guess_number", "high": 8, "search_fraction": 0.5}
    cfg = load_config(SFTConfig, {"model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic"}, "data": {"task": task}})
    assert build_task(cfg.data.task) == GuessNumberTask(low=1, high=8, max_guesses=5, search_fraction=0.5)
    with pytest.raises(ConfigError, match="digits: not a setting of the guess_number task"):
        load_config(SFTConfig, {"model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic"},
                                "data": {"task": {"name": "guess_number", "digits": 3}}})  # fmt: skip
    with pytest.raises(ConfigError, match="high: not a setting of the arithmetic task"):
        load_config(SFTConfig, {"model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic"},
                                "data": {"task": {"name": "arithmetic", "high": 3}}})  # fmt: skip


@pytest.mark.parametrize("kind", ["preference", "unpaired", "listwise"])
def test_feedback_rows_of_the_game_are_one_clear_error(kind):
    data = FeedbackDataSection(task={"name": "guess_number"})
    with pytest.raises(ConfigError, match=f"the guess_number task gives demonstrations.*{kind} rows"):
        load_feedback(data, kind, "train", build_builtin_tokenizer("arithmetic"), seed=0, recipe_dir=None)
