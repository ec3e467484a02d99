"""Presets sized to the tokenizer, exact save/load round trips, one-line load errors, LoRA."""

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, Qwen2ForCausalLM

from posttrain.policies import (
    MODEL_PRESETS,
    ModelLoadError,
    apply_lora,
    build_model,
    describe_forward_path,
    load_model,
    load_tokenizer,
    save_pretrained,
)
from posttrain.tasks import ArithmeticTask, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(ArithmeticTask().corpus(200))


@pytest.mark.parametrize(("preset", "cls"), [("qwen2-tiny", Qwen2ForCausalLM), ("llama-tiny", LlamaForCausalLM)])
def test_preset_is_sized_to_the_tokenizer(tokenizer, preset: str, cls: type) -> None:
    model = build_model(preset, tokenizer)
    assert isinstance(model, cls)
    p = MODEL_PRESETS[preset]
    assert model.config.vocab_size == len(tokenizer)
    assert model.get_input_embeddings().weight.shape == (len(tokenizer), p.hidden)
    assert model.config.num_hidden_layers == p.layers and model.config.hidden_size == p.hidden
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    # tied embeddings: the head is the embedding matrix
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_every_family_preset_takes_its_adapters_forward(tokenizer) -> None:
    # each "<family>-small" preset: its family's model class, the demo model's shape, the fast path for training and
    # decoding (tests/policies/test_families.py holds each adapter equal to transformers' forward)
    families = {name: p.family for name, p in MODEL_PRESETS.items() if name.endswith("-small")}
    assert sorted(families.values()) == sorted(["llama", "qwen2", "mistral", "qwen3", "gemma", "gemma2", "gemma3",
                                                "phi3", "olmo2", "mixtral", "qwen2_moe"])  # fmt: skip
    for name, family in families.items():
        model = build_model(name, tokenizer)
        assert type(model).__name__.lower() == f"{family.replace('_', '')}forcausallm", name
        config = model.config
        assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (128, 4, 2)
        assert model.get_output_embeddings().weight.shape == (len(tokenizer), 128)
        assert describe_forward_path(model).endswith("adapter) for training and decoding"), name


def test_build_model_is_seeded_and_leaves_the_global_rng_alone(tokenizer) -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_model("qwen2-tiny", tokenizer, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    b = build_model("qwen2-tiny", tokenizer, seed=5)
    c = build_model("qwen2-tiny", tokenizer, seed=6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)


def test_bfloat16_dtype(tokenizer) -> None:
    model = build_model("qwen2-tiny", tokenizer, dtype="bfloat16")
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16


def test_unknown_preset_lists_the_presets(tokenizer) -> None:
    with pytest.raises(ModelLoadError, match="qwen2-tiny") as info:
        build_model("gpt-huge", tokenizer)
    assert "'gpt-huge'" in str(info.value)


@pytest.mark.parametrize("preset", ["qwen2-tiny", "llama-tiny"])
def test_save_and_load_round_trip_exactly(tokenizer, tmp_path: Path, preset: str) -> None:
    model = build_model(preset, tokenizer, seed=3)
    with torch.no_grad():  # move away from the init so a re-initialised load cannot pass
        for param in model.parameters():
            param.add_(0.01)
    save_pretrained(model, tokenizer, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    loaded = load_model(tmp_path / "m")
    assert type(loaded) is type(model)
    original = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    ids = torch.tensor([[1, 5, 9, 40]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # the tokenizer saved beside it (qwen2/llama config.json) still encodes spaces
    tok = load_tokenizer(tmp_path / "m")
    assert tok.decode(tok.encode("12 + 3 = 15", add_special_tokens=False)) == "12 + 3 = 15"
    assert tok.get_vocab() == tokenizer.get_vocab()


def test_load_model_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        load_model(missing)
    assert str(missing) in str(info.value)
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file") as info:
        load_model(a_file)
    assert str(a_file) in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=r"no config\.json") as info:
        load_model(empty)
    assert str(empty) in str(info.value)
    with pytest.raises(ModelLoadError, match=r"model\.tokenizer"):
        load_tokenizer(missing)


def test_lora_trains_only_adapter_parameters(tokenizer, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    base = build_model("qwen2-tiny", tokenizer, seed=0)
    base.save_pretrained(tmp_path / "base")
    frozen_before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = apply_lora(base, r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"],
                       base_path=tmp_path / "base")  # fmt: skip
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # 2 layers x (q_proj, v_proj) x (lora_A, lora_B)
    assert len(trainable) == 8
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.tensor([[1, 5, 9, 40, 7]])
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.named_parameters():
        if "lora_" not in name:
            key = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(param, frozen_before[key]), name
    # lora_B starts at zero; after two steps it has moved
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    # a saved LoRA model is its adapter only, naming its base; loading it merges the adapter into the base
    save_pretrained(model, tokenizer, tmp_path / "lora")
    assert sorted(p.name for p in (tmp_path / "lora").glob("adapter_*")) == [
        "adapter_config.json", "adapter_model.safetensors"]
    assert not (tmp_path / "lora" / "model.safetensors").exists()
    merged = load_model(tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
