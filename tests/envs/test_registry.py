"""Environments by name, from a user's file, mixed in one batch by a row column; the recipe's env section."""

import textwrap

import pytest
from tests.envs.scripted import NoModel, ScriptedEngine

from posttrain.config.rl import RLConfig
from posttrain.data.encoding import PromptTokens
from posttrain.envs import SingleTurnEnv, StepResult, build_environments, environment_factory, sample_episodes
from posttrain.envs.registry import EnvironmentLoadError, EnvironmentMix
from posttrain.rollout import SamplingParams

PARAMS = SamplingParams(max_new_tokens=4, temperature=0.0)

USER_ENV = textwrap.dedent('''
    from posttrain.envs import StepResult

    class EchoTwice:
        """Replies with [7, 7] once, then ends; remembers its `greeting` arg."""

        def __init__(self, greeting: str = "hi", tokenizer=None):
            self.greeting, self.tokenizer, self.turns = greeting, tokenizer, 0

        def reset(self, row):
            return list(row["prompt_ids"])

        def step(self, completion_ids):
            self.turns += 1
            return StepResult([7, 7], done=self.turns == 2, info={"greeting": self.greeting})
''')


def test_a_user_class_is_loaded_from_its_file_with_args_and_the_tokenizer(tmp_path):
    (tmp_path / "my_env.py").write_text(USER_ENV)
    make = environment_factory("my_env.py:EchoTwice", {"greeting": "hello"}, tokenizer="TOK", base_dir=tmp_path)
    env = make()
    assert (env.greeting, env.tokenizer) == ("hello", "TOK")
    assert make() is not env  # one fresh environment per episode


def test_bad_names_and_args_are_one_clear_error(tmp_path):
    with pytest.raises(EnvironmentLoadError, match=r"not a built-in name.*built-ins: .*calculator"):
        environment_factory("no_such_env")
    with pytest.raises(EnvironmentLoadError, match=r"file 'missing\.py' not found"):
        environment_factory("missing.py:Env", base_dir=tmp_path)
    (tmp_path / "my_env.py").write_text(USER_ENV)
    with pytest.raises(EnvironmentLoadError, match=r"has no attribute 'Nope'; it defines: .*EchoTwice"):
        environment_factory("my_env.py:Nope", base_dir=tmp_path)
    with pytest.raises(EnvironmentLoadError, match=r"args \['colour'\] are not parameters of it; its parameters: gr"):
        environment_factory("my_env.py:EchoTwice", {"colour": "red"}, base_dir=tmp_path)


def test_rows_pick_their_environment_by_column(tmp_path):
    (tmp_path / "my_env.py").write_text(USER_ENV)
    mix = EnvironmentMix(SingleTurnEnv, {"echo": environment_factory("my_env.py:EchoTwice", base_dir=tmp_path)})
    prompts = [PromptTokens([1, 2], "row 1", {"environment": "echo"}), PromptTokens([3], "row 2", {})]
    engine = ScriptedEngine(lambda context: [5])
    out = sample_episodes(engine, NoModel(), prompts, PARAMS, n=2, generator=None, tokenizer=None, environment=mix)
    # row 1 (echo): model [5], env [7, 7], model [5]; row 2 (single-turn): model [5]
    assert out.completion_ids == [[5, 7, 7, 5], [5, 7, 7, 5], [5], [5]]
    assert out.model_token_mask[0].tolist() == [True, False, False, True]
    assert out.infos[0] == {"greeting": "hi"} and out.infos[2] == {}
    assert out.stats["episodes/turns"] == 2 + 2 + 1 + 1
    with pytest.raises(EnvironmentLoadError, match=r"'nope', which is not an entry of env\.mix; entries: echo"):
        mix.make({"environment": "nope"})


def test_the_recipe_env_section_builds_the_mix_and_rejects_unknown_names(tmp_path):
    (tmp_path / "my_env.py").write_text(USER_ENV)
    cfg = RLConfig.model_validate({
        "env": {"name": "single_turn", "mix": {"echo": {"name": "my_env.py:EchoTwice", "args": {"greeting": "yo"}}},
                "max_turns": 3},
    })
    mix = build_environments(cfg.env, tokenizer=None, base_dir=tmp_path)
    assert mix.default is SingleTurnEnv and mix.column == "environment"
    assert mix.make({"environment": "echo"}).greeting == "yo"
    assert RLConfig().env.name == "single_turn" and build_environments(RLConfig().env, tokenizer=None,
                                                                       base_dir=None).single_turn
    with pytest.raises(ValueError, match=r"env\.mix\.x\.name: 'nope' is not a registered environment"):
        RLConfig.model_validate({"env": {"mix": {"x": {"name": "nope"}}}})
    with pytest.raises(ValueError, match=r"max_turns"):
        RLConfig.model_validate({"env": {"max_turns": 0}})


def test_step_result_carries_a_reward_and_is_backward_compatible():
    result = StepResult([1], done=False)
    assert result.reward is None and result.context_ids is None and result.info == {}
