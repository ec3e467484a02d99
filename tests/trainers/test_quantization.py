"""`model.quantization` (issue #25.4): 4-bit and 8-bit loading through bitsandbytes for a LoRA adapter to train
(QLoRA), where a CUDA GPU is present; on CPU one clear line, and the GPU runs skipped."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from posttrain.api import sft
from posttrain.config import ConfigError, SFTConfig, load_config
from posttrain.policies import build_model, save_pretrained
from posttrain.tasks import build_builtin_tokenizer
from posttrain.trainers.build import build_policy

LORA = {"r": 4, "alpha": 8}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = build_builtin_tokenizer("arithmetic")
    out = tmp_path_factory.mktemp("model")
    save_pretrained(build_model("qwen2-tiny", tokenizer, seed=0), tokenizer, out)
    return out


def test_quantization_needs_a_local_model_and_a_lora_adapter() -> None:
    with pytest.raises(ConfigError, match=r"model\.quantization: 4bit loads model\.path's weights frozen"):
        load_config(SFTConfig, {"model": {"path": "m", "quantization": "4bit"}})
    with pytest.raises(ConfigError, match=r"set model\.path and model\.lora"):
        load_config(SFTConfig, {"model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic", "quantization": "8bit",
                                          "lora": LORA}})  # fmt: skip
    with pytest.raises(ConfigError, match=r"model\.quantization: Input should be '4bit' or '8bit'"):
        load_config(SFTConfig, {"model": {"path": "m", "quantization": "2bit", "lora": LORA}})


def test_on_cpu_it_is_one_line_before_anything_loads(model_dir: Path) -> None:
    cfg = load_config(SFTConfig, {"model": {"path": str(model_dir), "quantization": "4bit", "lora": LORA}})
    with pytest.raises(ConfigError, match=r"runs bitsandbytes' CUDA kernels, and this run's device is cpu \(no CUDA"):
        build_policy(cfg.model, seed=0, device=torch.device("cpu"), recipe_dir=None)


GPU = torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.skipif(not GPU, reason="4-bit and 8-bit loading needs a CUDA GPU and bitsandbytes (the quantization "
                    "extra); this machine has no GPU or no bitsandbytes")  # fmt: skip
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_sft_trains_a_lora_adapter_on_the_quantized_model(bits: str, model_dir: Path, tmp_path: Path) -> None:
    import bitsandbytes as bnb

    rows = [{"prompt": f"{a}+{a}=", "completion": str(2 * a)} for a in range(10)]
    config = {"model": {"path": str(model_dir), "quantization": bits, "lora": LORA}, "device": "cuda",
              "data": {"train": "in-memory", "max_length": 16}, "train": {"max_steps": 3, "batch_size": 4},
              "log": {"to": []}, "output_dir": str(tmp_path / "run")}  # fmt: skip
    result = sft(config, train=rows, progress=False)
    quantized = bnb.nn.Linear4bit if bits == "4bit" else bnb.nn.Linear8bitLt
    assert any(isinstance(m, quantized) for m in result.model.modules())
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert (result.final_dir / "adapter_config.json").is_file()  # the adapter, on its base model.path
