"""The Python API takes objects: a model object passed in is the object trained (no model.path needed), its
tokenizer comes from tokenizer=, the config or the directory it was loaded from, and rows passed in need no
data.train; a missing piece is one ConfigError."""

from pathlib import Path

import pytest
import torch

import posttrain
from posttrain.api import write_task
from posttrain.config import ConfigError
from posttrain.policies import build_model, load_model
from posttrain.tasks import build_builtin_tokenizer

ROWS = [{"prompt": f"{a}+{a}=", "completion": str(2 * a), "answer": str(2 * a)} for a in range(16)]


def tiny() -> tuple[torch.nn.Module, object]:
    tokenizer = build_builtin_tokenizer("arithmetic")
    return build_model("qwen2-tiny", tokenizer, seed=0), tokenizer


def test_a_model_object_is_the_object_trained_without_model_path(tmp_path: Path) -> None:
    model, tokenizer = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = posttrain.sft({"train": {"max_steps": 2, "batch_size": 8}, "output_dir": str(tmp_path)},
                           model=model, tokenizer=tokenizer, train=ROWS, progress=False)  # fmt: skip
    assert result.model is model
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_model_object_without_a_tokenizer_takes_the_one_of_its_directory(tmp_path: Path) -> None:
    model, tokenizer = tiny()
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    result = posttrain.sft({"train": {"max_steps": 1, "batch_size": 8}, "output_dir": str(tmp_path / "run")},
                           model=loaded, train=ROWS, progress=False)  # fmt: skip
    assert result.model is loaded and len(result.tokenizer) == len(tokenizer)


def test_a_model_object_without_any_tokenizer_is_one_clear_error(tmp_path: Path) -> None:
    model, _ = tiny()
    with pytest.raises(ConfigError, match="tokenizer="):
        posttrain.sft({"output_dir": str(tmp_path)}, model=model, train=ROWS, progress=False)


def test_rl_with_rows_and_a_model_object_needs_no_data_train(tmp_path: Path) -> None:
    model, tokenizer = tiny()

    def digits(completions, **kwargs):
        return [float(sum(ch.isdigit() for ch in c)) for c in completions]

    result = posttrain.rl(
        {"train": {"max_steps": 1}, "rl": {"prompts_per_step": 2, "group_size": 2,
                                            "sampling": {"max_new_tokens": 3}}, "output_dir": str(tmp_path)},
        model=model, tokenizer=tokenizer, train=ROWS, rewards=[digits], progress=False,
    )  # fmt: skip
    assert result.model is model and len(result.history) == 1


def test_write_task_of_a_task_it_does_not_write_names_the_ones_a_recipe_generates(tmp_path: Path) -> None:
    written = r"writes arithmetic, reverse, sort, count, sequence only.*arithmetic, count, guess_number"
    with pytest.raises(ConfigError, match=written):
        write_task("guess_number", tmp_path / "out")
    assert not (tmp_path / "out").exists()
