"""Recipes, dotted overrides, `inherit:` and one-line ConfigErrors that name the key and what is allowed."""

import re
from pathlib import Path

import pytest

from posttrain.config import ConfigError, EvalConfig, RLConfig, SFTConfig, describe_options, load_config, validate
from posttrain.trainers.evaluation import run_evaluation
from posttrain.trainers.sft import train_sft

GOOD_RECIPE = """\
model:
  preset: qwen2-tiny
  tokenizer: arithmetic
data:
  task:
    name: arithmetic
    train_size: 100
train:
  max_steps: 7
  batch_size: 4
"""

BASE = ["model.preset=qwen2-tiny", "model.tokenizer=arithmetic", "data.task.name=arithmetic"]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def error_of(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(SFTConfig, None, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_good_recipe_with_overrides_has_the_right_types(tmp_path: Path) -> None:
    recipe = write(tmp_path / "r.yaml", GOOD_RECIPE)
    cfg = load_config(SFTConfig, recipe, ["train.lr=3e-4", "model.path=/x", "model.preset=null", "seed=7"])
    # YAML 1.1 reads "3e-4" as a string; pydantic must still give a float
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 3e-4
    assert cfg.model.path == "/x" and cfg.model.preset is None
    assert cfg.seed == 7 and isinstance(cfg.seed, int)
    assert cfg.train.max_steps == 7 and cfg.train.batch_size == 4
    assert cfg.data.task is not None and cfg.data.task.train_size == 100
    assert cfg.data.task.eval_size == 500  # a default kept
    assert cfg.recipe_dir == str(tmp_path.resolve())


def test_override_of_a_whole_dotted_path_creates_sections() -> None:
    cfg = load_config(SFTConfig, None, [*BASE, "train.adam_betas=[0.8, 0.95]", "train.max_grad_norm=null"])
    assert cfg.train.adam_betas == (0.8, 0.95)
    assert cfg.train.max_grad_norm is None


def test_inherit_merges_nested_keys_and_the_child_wins(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", GOOD_RECIPE)
    (tmp_path / "sub").mkdir()
    child = write(tmp_path / "sub" / "child.yaml", "inherit: ../base.yaml\ntrain:\n  lr: 0.01\n")
    cfg = load_config(SFTConfig, child, ["train.batch_size=8"])
    assert cfg.train.lr == 0.01  # from the child
    assert cfg.train.max_steps == 7  # from the parent, same section
    assert cfg.train.batch_size == 8  # the command line beats both
    assert cfg.model.preset == "qwen2-tiny"


def test_inherit_loop_is_an_error(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", "inherit: b.yaml\n")
    write(tmp_path / "b.yaml", "inherit: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(SFTConfig, a)


def test_missing_recipe_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(SFTConfig, tmp_path / "nope.yaml")


def test_unknown_top_level_key_names_it_and_lists_the_allowed_keys() -> None:
    message = error_of([*BASE, "bogus=1"])
    assert message.startswith("bogus: unknown key")
    for allowed in ("output_dir", "seed", "model", "data", "train", "eval"):
        assert allowed in message
    assert "recipe_dir" not in message  # internal, excluded


def test_unknown_nested_key_lists_that_sections_keys() -> None:
    message = error_of([*BASE, "train.lrr=0.1"])
    assert message.startswith("train.lrr: unknown key")
    assert "lr" in message and "max_steps" in message and "warmup_steps" in message


def test_wrong_type_names_the_key_and_the_value() -> None:
    message = error_of([*BASE, "train.lr=abc"])
    assert message.startswith("train.lr:")
    assert "number" in message and "'abc'" in message
    message = error_of([*BASE, "train.max_steps=1.5"])
    assert message.startswith("train.max_steps:") and "integer" in message


def test_negative_lr_is_rejected() -> None:
    message = error_of([*BASE, "train.lr=-1"])
    assert message.startswith("train.lr:") and "greater than 0" in message and "-1" in message


def test_literal_choice_lists_the_allowed_values() -> None:
    message = error_of([*BASE, "train.schedule=step"])
    assert message.startswith("train.schedule:")
    assert "cosine" in message and "linear" in message and "constant" in message


def test_model_path_and_preset_together_are_an_error() -> None:
    message = error_of(["model.path=/x", "model.preset=qwen2-tiny", "model.tokenizer=arithmetic",
                        "data.task.name=arithmetic"])  # fmt: skip
    assert message.startswith("model:")
    assert "model.path" in message and "model.preset" in message


def test_a_run_without_a_model_source_names_both_keys(tmp_path: Path) -> None:
    # no model.path, no model.preset and no model object: one ConfigError when the run starts
    cfg = load_config(SFTConfig, None, ["data.task.name=arithmetic", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError) as info:
        train_sft(cfg, progress=False)
    assert "model.path" in str(info.value) and "model.preset" in str(info.value)


def test_preset_needs_a_tokenizer() -> None:
    message = error_of(["model.preset=qwen2-tiny", "data.task.name=arithmetic"])
    assert "model.tokenizer" in message


def test_a_run_without_training_data_names_the_sources(tmp_path: Path) -> None:
    cfg = load_config(SFTConfig, None, [*BASE[:2], "data.max_length=64", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError) as info:
        train_sft(cfg, progress=False)
    assert "data.train" in str(info.value) and "data.task" in str(info.value)


def test_evaluation_without_eval_data_names_the_sources(tmp_path: Path) -> None:
    cfg = load_config(EvalConfig, None, [*BASE[:2], "data.train=t.jsonl", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"data\.eval"):
        run_evaluation(cfg)


def test_eval_k_above_samples() -> None:
    message = error_of([*BASE, "eval.k=3", "eval.samples=2"])
    assert message.startswith("eval:") and "eval.k=3" in message and "eval.samples" in message
    cfg = load_config(SFTConfig, None, [*BASE, "eval.k=2", "eval.samples=2"])  # k == samples is fine
    assert cfg.eval.k == 2


@pytest.mark.parametrize("override", ["foo", "=3", "train.=3", ".lr=3"])
def test_malformed_override(override: str) -> None:
    message = error_of([*BASE, override])
    assert f"'{override}'" in message and "key.sub=value" in message


def test_override_into_a_value_is_an_error(tmp_path: Path) -> None:
    recipe = write(tmp_path / "r.yaml", GOOD_RECIPE + "seed: 3\n")
    with pytest.raises(ConfigError, match="'seed' is a value, not a section"):
        load_config(SFTConfig, recipe, ["seed.x=1"])
    # without a recipe value the override builds a mapping, which the int field rejects
    assert error_of([*BASE, "seed.x=1"]).startswith("seed:")


def test_configs_are_frozen() -> None:
    cfg = validate(SFTConfig, {"model": {"path": "/x"}, "data": {"train": "t.jsonl"}})
    with pytest.raises(Exception):  # noqa: B017 (pydantic's ValidationError for a frozen instance)
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_describe_options_lists_leaf_keys_with_defaults() -> None:
    rows = {key: (default, text) for key, default, text in describe_options(SFTConfig)}
    assert rows["train.lr"][0] == "0.001"
    assert "learning rate" in rows["train.lr"][1]
    assert rows["train.max_steps"][0] == "200"
    assert rows["model.path"][0] == "null"
    assert rows["model.lora"][0] == "null" and "a section" in rows["model.lora"][1]
    assert rows["train.schedule"][0] == "cosine"
    assert "recipe_dir" not in rows


def test_describe_options_shows_a_list_of_sections_default() -> None:
    # a default that is a list of config models (e.g. several reward entries) cannot go through yaml
    from pydantic import BaseModel, ConfigDict

    class Entry(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        name: str = "a"

    class WithList(BaseModel):
        entries: list[Entry] = [Entry(), Entry(name="b")]
        plain: list[int] = [1, 2]

    rows = {key: default for key, default, _ in describe_options(WithList)}
    assert rows == {"entries": "[{name: a}, {name: b}]", "plain": "[1, 2]"}


def model_dir_with_tokenizer(path: Path, *, tokenizer: bool) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
    return path


def test_an_override_of_model_path_replaces_the_recipes_preset_and_its_tokenizer(tmp_path: Path) -> None:
    # the README's line: posttrain sft recipes/arith-sft.yaml model.path=/my/model data.train=my.jsonl
    recipe = write(tmp_path / "r.yaml", GOOD_RECIPE)
    mine = model_dir_with_tokenizer(tmp_path / "mine", tokenizer=True)
    cfg = load_config(SFTConfig, recipe, [f"model.path={mine}", "data.train=my.jsonl"])
    assert cfg.model.path == str(mine) and cfg.model.preset is None
    assert cfg.model.tokenizer is None  # the directory's own tokenizer, not the recipe's built-in one
    assert cfg.data.train == "my.jsonl" and cfg.data.task is not None  # the task is left for held-out rows
    assert any("model.preset=qwen2-tiny" in note for note in cfg.load_notes)
    assert any("model.tokenizer=arithmetic" in note for note in cfg.load_notes)


def test_the_recipes_tokenizer_stays_for_a_model_directory_without_one(tmp_path: Path) -> None:
    recipe = write(tmp_path / "r.yaml", GOOD_RECIPE)
    bare = model_dir_with_tokenizer(tmp_path / "bare", tokenizer=False)
    cfg = load_config(SFTConfig, recipe, [f"model.path={bare}"])
    assert cfg.model.preset is None and cfg.model.tokenizer == "arithmetic"


def test_an_override_of_model_tokenizer_wins_over_the_model_directorys(tmp_path: Path) -> None:
    recipe = write(tmp_path / "r.yaml", GOOD_RECIPE)
    mine = model_dir_with_tokenizer(tmp_path / "mine", tokenizer=True)
    cfg = load_config(SFTConfig, recipe, [f"model.path={mine}", "model.tokenizer=arithmetic"])
    assert cfg.model.tokenizer == "arithmetic" and cfg.model.preset is None


def test_an_override_of_model_preset_replaces_the_recipes_path(tmp_path: Path) -> None:
    recipe = write(tmp_path / "r.yaml", "model: {path: /somewhere, tokenizer: arithmetic}\ndata: {task: {}}\n")
    cfg = load_config(SFTConfig, recipe, ["model.preset=qwen2-tiny"])
    assert cfg.model.preset == "qwen2-tiny" and cfg.model.path is None
    assert any("model.path=/somewhere" in note for note in cfg.load_notes)


def test_a_child_recipes_model_path_replaces_its_parents_preset(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", GOOD_RECIPE)
    child = write(tmp_path / "child.yaml", "inherit: base.yaml\nmodel: {path: /x}\n")
    cfg = load_config(SFTConfig, child)
    assert cfg.model.path == "/x" and cfg.model.preset is None and cfg.model.tokenizer == "arithmetic"


def test_the_python_api_applies_overrides_by_the_same_rule(tmp_path: Path) -> None:
    from posttrain.api import as_config

    mine = model_dir_with_tokenizer(tmp_path / "mine", tokenizer=True)
    raw = {"model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic"}, "data": {"task": {"name": "arithmetic"}}}
    for config in (raw, validate(SFTConfig, raw)):
        cfg = as_config(SFTConfig, config, [f"model.path={mine}"])
        assert cfg.model.path == str(mine) and cfg.model.preset is None and cfg.model.tokenizer is None
# --- recipes that would exhaust memory or the stack (issue #21, item 7) ------------------------------------

def billion_laughs(levels: int = 9) -> str:
    """Each level lists the one before 9 times: 9 ** levels strings once expanded (387 million at 9), in a few
    hundred bytes of YAML."""
    text = 'a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for i in range(1, levels):
        text += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n"
    return text + f"train:\n  lr: *a{levels - 1}\n"


def test_a_yaml_bomb_is_refused_in_one_short_line(tmp_path: Path) -> None:
    # the validation error's repr of the expanded value ran out of memory
    recipe = write(tmp_path / "r.yaml", billion_laughs())
    with pytest.raises(ConfigError) as error:
        load_config(SFTConfig, recipe)
    message = str(error.value)
    # a4 (line 5) is the first to expand past the limit: 9 ** 5 = 59,049 strings of 3 characters
    assert message.startswith(f"recipe {recipe} line 5: aliases expand the document past ") and len(message) < 300
    with pytest.raises(ConfigError, match=r"^override 'train.lr=.*: aliases expand the document past"):
        load_config(SFTConfig, None, [*BASE, "train.lr=" + billion_laughs()])


def test_aliases_and_merge_keys_within_bounds_still_work(tmp_path: Path) -> None:
    recipe = write(tmp_path / "r.yaml", """\
model: {preset: qwen2-tiny, tokenizer: &task arithmetic}
data:
  task: {name: *task, train_size: 100}
train:
  <<: {max_steps: 7, batch_size: 4}
  lr: 0.01
""")
    cfg = load_config(SFTConfig, recipe)
    assert cfg.data.task is not None and cfg.data.task.name == "arithmetic"
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.train.lr) == (7, 4, 0.01)


def test_an_alias_inside_the_node_it_names_is_refused(tmp_path: Path) -> None:
    recipe = write(tmp_path / "r.yaml", GOOD_RECIPE + "eval: &e {limit: *e}\n")
    with pytest.raises(ConfigError, match=re.escape(f"recipe {recipe} line 11: an alias inside the node it names")):
        load_config(SFTConfig, recipe)


def test_deep_nesting_is_one_error_naming_the_line(tmp_path: Path) -> None:
    # PyYAML composes nodes recursively: 100,000 brackets raised RecursionError
    recipe = write(tmp_path / "r.yaml", GOOD_RECIPE + "seed: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match=re.escape(f"recipe {recipe} line 11: mappings and lists nested more than "
                                                    "64 deep")):
        load_config(SFTConfig, recipe)
    assert "nested more than 64 deep" in error_of([*BASE, "seed=" + "[" * 100_000 + "]" * 100_000])
    deep_aliases = "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 70))
    write(recipe, "a0: &a0 [1]\n" + deep_aliases)  # 70 levels, 2 in each node: deep only through aliases
    with pytest.raises(ConfigError, match="nested more than 64 deep \\(through aliases\\)"):
        load_config(SFTConfig, recipe)


def test_a_lone_surrogate_in_a_recipe_or_override_is_named(tmp_path: Path) -> None:
    recipe = write(tmp_path / "r.yaml", GOOD_RECIPE + 'output_dir: "runs/\\ud800"\n')
    with pytest.raises(ConfigError, match=re.escape(f"recipe {recipe} line 11: lone surrogate U+D800")):
        load_config(SFTConfig, recipe)
    assert "lone surrogate U+D800" in error_of([*BASE, 'output_dir="runs/\\ud800"'])  # YAML's escape
    # a non-UTF-8 byte of a path in argv reaches Python as one too ("surrogateescape"): such a value is not YAML
    # (its reader refuses it), so the override is its text, the path, which the file system takes back
    assert load_config(SFTConfig, None, [*BASE, "output_dir=runs/\udcff"]).output_dir == "runs/\udcff"
    # elsewhere it is a ConfigError; a validator's message that held it raised UnicodeEncodeError (pydantic-core)
    with pytest.raises(ConfigError, match=re.escape("rl.loss_aggregation: '\\udcff' holds a lone surrogate")):
        load_config(RLConfig, None, [*BASE, "rl.loss_aggregation=\udcff"])


def test_a_huge_value_is_shown_in_a_few_dozen_characters() -> None:
    message = error_of([*BASE, "train.lr=[" + ", ".join(["12345678"] * 100_000) + "]"])
    assert message.startswith("train.lr: Input should be a valid number (got [12345678, 12345678,")
    assert len(message) < 200


def test_a_recipe_over_one_mib_or_of_unbuildable_values_is_one_error(tmp_path: Path) -> None:
    recipe = write(tmp_path / "r.yaml", GOOD_RECIPE + "# " + "x" * 2**20 + "\n")
    with pytest.raises(ConfigError, match=f"recipe {re.escape(str(recipe))} is larger than 1 MiB"):
        load_config(SFTConfig, recipe)
    # a date that is none; an int past Python's 4,300 digits; explicit tags on values that are not of the type
    for value in ("2020-13-45", "1" * 5000, '!!int ""', "!!bool maybe", "!!timestamp x"):
        write(recipe, GOOD_RECIPE + f"seed: {value}\n")
        with pytest.raises(ConfigError, match=f"recipe {re.escape(str(recipe))} line 11: a value cannot be read"):
            load_config(SFTConfig, recipe)
        assert error_of([*BASE, f"seed={value}"]).startswith("seed: ")  # an override's value is then its text
    write(recipe, "seed: !" + "9" * 5000 + " 1\n")  # PyYAML's own error quotes the whole tag
    with pytest.raises(ConfigError, match=f"recipe {re.escape(str(recipe))} is not valid YAML: ") as error:
        load_config(SFTConfig, recipe)
    assert len(str(error.value)) < 800 and "\n" not in str(error.value)
    write(recipe, "inherit: 5\n")
    with pytest.raises(ConfigError, match="inherit: expected the path of a recipe, got 5"):
        load_config(SFTConfig, recipe)
