"""Loading `fn:` strings: built-in names, module:function, path.py:function, and the errors."""

import functools
import importlib.util
import subprocess
import sys

import pytest

from posttrain.rewards import BUILTIN_REWARDS, RewardLoadError, RewardSet, RewardSpec, load_reward_fn
from posttrain.rewards.format import FormatReward
from posttrain.rewards.length import OverlongPenalty
from posttrain.rewards.loading import default_reward_name, resolve_reward_target
from posttrain.rewards.verifiers import exact_match

TRL_STYLE_FILE = '''
def starts_with_yes(prompts, completions, completion_ids, **kwargs):
    """A TRL-style reward: positional names, **kwargs for every other column."""
    return [1.0 if c.startswith("yes") else 0.0 for c in completions]


def scaled_length(completions, scale, **kwargs):
    return [scale * len(c) for c in completions]


NOT_CALLABLE = 3
'''


@pytest.fixture
def recipe_dir(tmp_path):
    (tmp_path / "my_rewards.py").write_text(TRL_STYLE_FILE)
    return tmp_path


def test_every_builtin_name_is_registered():
    assert set(BUILTIN_REWARDS) == {
        "exact_match",
        "numeric_match",
        "math_verify",
        "format",
        "length_penalty",
        "overlong_penalty",
        "reward_model",
        "ensemble",
        "code_tests",
        "tool_efficiency",
    }


def test_builtin_function_without_args_is_returned_as_is():
    assert load_reward_fn("exact_match") is exact_match


def test_builtin_class_is_built_from_args():
    reward = load_reward_fn("overlong_penalty", {"max_new_tokens": 32, "overlong_buffer": 8})
    assert isinstance(reward, OverlongPenalty)
    assert (reward.max_new_tokens, reward.overlong_buffer) == (32, 8)
    assert isinstance(load_reward_fn("format"), FormatReward)


def test_builtin_function_gets_args_bound_as_keywords():
    reward = load_reward_fn("numeric_match", {"abs_tol": 0.5})
    assert isinstance(reward, functools.partial) and reward.__name__ == "numeric_match"
    # |4.4 - 4| = 0.4 <= 0.5
    assert reward(prompts=["q"], completions=["4.4"], completion_ids=[[1]], answer=["4"]) == [1.0]


def test_code_tests_is_registered_lazily():
    assert BUILTIN_REWARDS["code_tests"] == "posttrain.rewards.code:code_tests_reward"
    if importlib.util.find_spec("posttrain.rewards.code") is not None:  # once the sandbox module landed
        assert callable(resolve_reward_target("code_tests"))


def test_builtin_whose_module_is_absent_names_it(monkeypatch):
    monkeypatch.setitem(BUILTIN_REWARDS, "later", "posttrain.rewards.not_landed_yet:reward")
    with pytest.raises(RewardLoadError, match=r"'later' lives in module posttrain.rewards.not_landed_yet"):
        load_reward_fn("later")


def test_importing_the_package_loads_no_optional_part():
    code = (
        "import sys, posttrain.rewards; "
        "print(sorted(m for m in ('math_verify', 'transformers', 'posttrain.rewards.code') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_user_file_relative_to_base_dir_with_trl_signature(recipe_dir):
    reward = load_reward_fn("my_rewards.py:starts_with_yes", base_dir=recipe_dir)
    scores = reward(prompts=["p", "p"], completions=["yes!", "no"], completion_ids=[[1], [2]], answer=[1, 2])
    assert scores == [1.0, 0.0]


def test_user_file_relative_to_cwd_and_args(recipe_dir, monkeypatch):
    monkeypatch.chdir(recipe_dir)
    reward = load_reward_fn("./my_rewards.py:scaled_length", {"scale": 0.5})
    assert reward(prompts=["p"], completions=["abcd"], completion_ids=[[1]]) == [2.0]


def test_user_file_is_imported_once(recipe_dir):
    first = resolve_reward_target("my_rewards.py:starts_with_yes", recipe_dir)
    second = resolve_reward_target("my_rewards.py:scaled_length", recipe_dir)
    assert first.__globals__ is second.__globals__


def test_module_function_path():
    assert load_reward_fn("posttrain.rewards.verifiers:exact_match") is exact_match
    assert default_reward_name("posttrain.rewards.verifiers:exact_match") == "exact_match"
    assert default_reward_name("rewards/mine.py:score") == "score"


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        ("no_such_reward", r"'no_such_reward': not a built-in name.*built-ins: code_tests, ensemble"),
        ("missing.py:f", r"'missing.py:f': file 'missing.py' not found \(looked at .*missing.py"),
        ("my_rewards.py:nope", r"has no attribute 'nope'; it defines: .*scaled_length"),
        ("my_rewards.py:NOT_CALLABLE", r"'my_rewards.py:NOT_CALLABLE': 3 is not callable"),
        ("posttrain_no_such_pkg.mod:f", r"cannot import module 'posttrain_no_such_pkg.mod'"),
    ],
)
def test_load_errors_name_the_spec_and_the_problem(recipe_dir, fn, message):
    with pytest.raises(RewardLoadError, match=message):
        load_reward_fn(fn, base_dir=recipe_dir)


def test_args_that_are_not_parameters_fail_at_load_time():
    with pytest.raises(RewardLoadError, match=r"'overlong_penalty': args \['max_tokens'\] are not parameters"):
        load_reward_fn("overlong_penalty", {"max_tokens": 3})
    # length_penalty takes **kwargs (for the columns), which must not swallow a misspelt arg
    with pytest.raises(
        RewardLoadError,
        match=r"args \['per_tokn'\] .*parameters: completion_ids, penalty_per_token, free_tokens",
    ):
        load_reward_fn("length_penalty", {"per_tokn": 3})


def test_user_file_that_fails_to_import(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(RewardLoadError, match=r"importing .*broken.py failed: RuntimeError: boom"):
        load_reward_fn("broken.py:f", base_dir=tmp_path)


def test_from_specs_builds_names_and_rejects_duplicates(recipe_dir):
    rewards = RewardSet.from_specs(
        [
            RewardSpec("my_rewards.py:starts_with_yes"),
            {"fn": "format", "weight": 0.5, "name": "fmt"},
        ],
        base_dir=recipe_dir,
    )
    assert rewards.names == ["starts_with_yes", "fmt"]
    with pytest.raises(RewardLoadError, match="two rewards are named 'exact_match'"):
        RewardSet.from_specs([RewardSpec("exact_match"), RewardSpec("exact_match")])
    with pytest.raises(ValueError, match=r"reward 0: unknown keys \['wieght'\]; allowed: args, failure_score"):
        RewardSet.from_specs([{"fn": "exact_match", "wieght": 2.0}])


def test_constructor_errors_say_which_spec(recipe_dir):
    with pytest.raises(ValueError, match="overlong_buffer <= max_new_tokens") as info:
        RewardSet.from_specs([RewardSpec("overlong_penalty", args={"max_new_tokens": 4, "overlong_buffer": 8})])
    assert "while building reward 0 ('overlong_penalty'" in "".join(info.value.__notes__)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight": float("nan")}, "weight must be a finite number"),
        ({"timeout_s": 0.0}, "timeout_s must be > 0 or None"),
        ({"failure_score": float("inf")}, "failure_score must be a finite number"),
        ({"fn": ""}, "fn must be a non-empty string"),
    ],
)
def test_reward_spec_validates_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RewardSpec(**{"fn": "exact_match", **kwargs})
