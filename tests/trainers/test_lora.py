"""LoRA runs: exact resume, adapter-only checkpoints and final/ naming the original base, the base with its
adapters off as the reference (no copy), and `posttrain export --merge`."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.api import export, pref, rl, sft
from posttrain.cli import main
from posttrain.config import ModelSection
from posttrain.policies import AdapterOff, load_model
from posttrain.trainers.build import policy_and_reference

pytest.importorskip("peft")
TASK = {"name": "arithmetic", "digits": 1, "train_size": 200, "eval_size": 8}
IDS = torch.tensor([[1, 5, 9, 40, 7, 12]])


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full model on disk, as a user's own model would be."""
    out = tmp_path_factory.mktemp("base")
    sft({"model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic"}, "data": {"task": TASK},
         "train": {"max_steps": 3, "batch_size": 8}, "output_dir": str(out)}, progress=False)  # fmt: skip
    return out / "final"


def sft_config(base: Path, out: Path, steps: int) -> dict:
    return {"model": {"path": str(base), "lora": {"r": 4, "alpha": 8}}, "data": {"task": TASK},
            "train": {"max_steps": steps, "batch_size": 8, "lr": 1e-2, "save_every": 3, "keep_last": 1},
            "output_dir": str(out)}  # fmt: skip


def test_a_resumed_lora_run_equals_the_uninterrupted_one(base: Path, tmp_path: Path) -> None:
    whole = sft(sft_config(base, tmp_path / "whole", 6), progress=False).history
    sft(sft_config(base, tmp_path / "cut", 3), progress=False)
    resumed = sft(sft_config(base, tmp_path / "cut", 6), resume=True, progress=False).history
    assert [h["loss"] for h in resumed] == [h["loss"] for h in whole]


def test_checkpoints_and_final_hold_the_adapter_on_the_original_base(base: Path, tmp_path: Path) -> None:
    result = sft(sft_config(base, tmp_path, 6), progress=False)
    final = tmp_path / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    for checkpoint in (tmp_path / "checkpoints").iterdir():
        assert not (checkpoint / "model" / "model.safetensors").exists()
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base.resolve())
    # the base with the final adapter, by peft, by transformers' own adapter loading, and merged by posttrain
    from peft import PeftModel

    with torch.no_grad():
        trained = result.model(IDS).logits
        by_peft = PeftModel.from_pretrained(load_model(base), str(final))(IDS).logits
        by_transformers = AutoModelForCausalLM.from_pretrained(final)(IDS).logits
        merged = load_model(final)(IDS).logits
    for logits in (by_peft, by_transformers, merged):
        torch.testing.assert_close(logits, trained, atol=1e-5, rtol=1e-5)


def test_a_preset_lora_runs_base_is_saved_in_the_run(tmp_path: Path) -> None:
    config = {"model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic", "lora": {"r": 2}}, "data": {"task": TASK},
              "train": {"max_steps": 1, "batch_size": 8}, "output_dir": str(tmp_path)}  # fmt: skip
    sft(config, progress=False)
    named = json.loads((tmp_path / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert named == str((tmp_path / "base").resolve()) and (tmp_path / "base" / "config.json").is_file()


def test_the_reference_of_a_lora_policy_is_its_base_with_adapters_off(base: Path) -> None:
    section = ModelSection(path=str(base), lora={"r": 4})
    policy, _, reference = policy_and_reference(section, None, None, None, needs_reference=True, seed=0,
                                                device=torch.device("cpu"), recipe_dir=None)  # fmt: skip
    assert isinstance(reference, AdapterOff) and reference.model is policy  # no second copy of the weights
    for name, parameter in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter)
    with torch.no_grad(), reference.active():
        off = policy(IDS).logits
    with torch.no_grad():
        torch.testing.assert_close(off, load_model(base)(IDS).logits)
        assert not torch.allclose(policy(IDS).logits, off)


def test_lora_rl_with_kl_and_dpo_run_and_resume_exactly(base: Path, tmp_path: Path) -> None:
    rl_cfg = lambda out, steps: {
        "model": {"path": str(base), "lora": {"r": 4}}, "data": {"task": TASK, "max_length": 16},
        "train": {"max_steps": steps, "lr": 1e-3, "save_every": 2}, "eval": {"limit": 4},
        "rl": {"prompts_per_step": 2, "group_size": 4, "sampling": {"max_new_tokens": 3},
               "kl": {"coef": 0.1}}, "output_dir": str(out)}  # fmt: skip
    whole = rl(rl_cfg(tmp_path / "whole", 4), progress=False).history
    rl(rl_cfg(tmp_path / "cut", 2), progress=False)
    resumed = rl(rl_cfg(tmp_path / "cut", 4), resume=True, progress=False).history
    assert [h["loss"] for h in resumed] == [h["loss"] for h in whole]
    assert [h["kl"] for h in resumed] == [h["kl"] for h in whole]
    dpo = pref({"model": {"path": str(base), "lora": {"r": 4}}, "data": {"task": {**TASK, "kind": "preference"}},
                "train": {"max_steps": 3, "batch_size": 8, "lr": 1e-2}, "output_dir": str(tmp_path / "dpo")},
               progress=False)  # fmt: skip
    assert dpo.history[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # the base is the reference at step 1
    assert dpo.history[-1]["reward_margin"] > 0


def test_export_merge_writes_a_full_model_equal_to_base_plus_adapter(base: Path, tmp_path: Path) -> None:
    result = sft(sft_config(base, tmp_path, 3), progress=False)
    with pytest.raises(Exception, match="--merge"):
        export(tmp_path)
    assert main(["export", str(tmp_path), "--merge"]) == 0
    merged_dir = tmp_path / "merged"
    assert (merged_dir / "config.json").is_file() and not (merged_dir / "adapter_config.json").exists()
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(merged_dir)(IDS).logits,
                                   result.model(IDS).logits, atol=1e-5, rtol=1e-5)  # fmt: skip
    assert (merged_dir / "tokenizer.json").is_file()


def test_a_refreshed_lora_reference_is_the_policy_at_the_refresh(base: Path) -> None:
    section = ModelSection(path=str(base), lora={"r": 4})
    policy, _, reference = policy_and_reference(section, None, None, None, needs_reference=True, seed=0,
                                                device=torch.device("cpu"), recipe_dir=None)  # fmt: skip
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
        reference.refresh(policy)
        at_refresh = policy(IDS).logits
        for name, parameter in policy.named_parameters():
            if "lora_B" in name and "reference" not in name:
                parameter.add_(1.0)  # the policy trains on after the refresh
        with reference.active():
            torch.testing.assert_close(policy(IDS).logits, at_refresh)
        assert not torch.allclose(policy(IDS).logits, at_refresh)
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable  # the copy never trains
