"""Fuzzing the config loader (issue #21, item 8): random YAML text, random nested structures under the real keys,
random bytes as a recipe, and random overrides load into a config or raise ConfigError, never another exception
(RecursionError, MemoryError, TypeError, a YAML error of its own), within a bounded amount of memory, and an error
message stays one short line."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posttrain.config import (
    ConfigError,
    EvalConfig,
    PrefConfig,
    RLConfig,
    RMConfig,
    SFTConfig,
    describe_options,
    load_config,
)

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
MODELS = st.sampled_from([SFTConfig, RLConfig, PrefConfig, RMConfig, EvalConfig])
# every leaf key of every config, and their sections; not `plugins`, which imports what it names
KEYS = sorted({key for model in (SFTConfig, RLConfig, PrefConfig, RMConfig, EvalConfig)
               for key, _, _ in describe_options(model)} - {"plugins"})
NAMES = sorted({part for key in KEYS for part in key.split(".")} | {"inherit", "name", "weight", "args"})
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
                   st.sampled_from(["qwen2-tiny", "arithmetic", "grpo", "dpo", "numeric_match", "1e-3", "-1", "",
                                    "\ud800", "runs/x", "nope.yaml", "cuda", "auto", "bfloat16"]))
VALUE = st.recursive(
    SCALAR,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.one_of(st.sampled_from(NAMES), st.text(max_size=4)), inner, max_size=4)),
    max_leaves=15,
)
YAML_TEXT = st.lists(
    st.sampled_from([*":-[]{}&*!|>'\"#,?%@`\\\n\t ab1.", "\\ud800", "\\x00", "\ud800", "é", "<<", "&a", "*a", "!!int",
                     "- ", "1e400", "2020-13-45", "9" * 5000]),
    max_size=60,
).map("".join)


def load(model: Any, recipe: Path | None, overrides: list[str] = ()) -> None:
    """Load a config; only a ConfigError may escape, and its message is one short line."""
    try:
        load_config(model, recipe, list(overrides))
    except ConfigError as error:
        message = str(error)
        assert "\n" not in message and len(message) < 8_000


@pytest.fixture
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "r.yaml"


@SETTINGS
@given(text=YAML_TEXT, model=MODELS)
def test_random_yaml_text_raises_only_config_errors(recipe: Path, text: str, model: Any):
    recipe.write_text(text, encoding="utf-8", errors="surrogatepass")
    load(model, recipe)


@SETTINGS
@given(data=st.binary(max_size=300), model=MODELS)
def test_random_bytes_raise_only_config_errors(recipe: Path, data: bytes, model: Any):
    recipe.write_bytes(data)
    load(model, recipe)


@SETTINGS
@given(tree=st.dictionaries(st.sampled_from(NAMES), VALUE, max_size=6), model=MODELS,
       anchors=st.booleans())
def test_random_nested_recipes_raise_only_config_errors(recipe: Path, tree: dict[str, Any], model: Any, anchors: bool):
    # yaml.dump writes &anchors and *aliases for values that are the same object
    shared = [tree, tree] if anchors else tree
    text = yaml.dump({"recipe": shared} if anchors else shared, allow_unicode=True)
    recipe.write_text(text, encoding="utf-8", errors="surrogatepass")
    load(model, recipe)


@SETTINGS
@given(overrides=st.lists(st.tuples(st.sampled_from(KEYS + NAMES), st.one_of(YAML_TEXT, st.builds(str, SCALAR))),
                          max_size=5), model=MODELS)
def test_random_overrides_raise_only_config_errors(overrides: list[tuple[str, str]], model: Any):
    load(model, None, [f"{key}={value}" for key, value in overrides])


@settings(SETTINGS, max_examples=30)
@given(depth=st.integers(min_value=1, max_value=300), levels=st.integers(min_value=1, max_value=12),
       width=st.integers(min_value=1, max_value=12), model=MODELS)
def test_deep_or_expanding_recipes_stay_within_a_bounded_amount_of_memory(recipe: Path, depth: int, levels: int,
                                                                         width: int, model: Any):
    bomb = "a0: &a0 [lol]\n" + "".join(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]\n"
                                       for i in range(1, levels))
    recipe.write_text(bomb + "seed: " + "[" * depth + "]" * depth + f"\ntrain: {{lr: *a{levels - 1}}}\n")
    tracemalloc.start()
    try:
        load(model, recipe)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20  # the composed nodes of a 10 kB text, not the 12 ** 12 values they stand for
