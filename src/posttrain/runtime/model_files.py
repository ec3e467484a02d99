"""The files that make a directory a Hugging Face model, tokenizer or adapter directory (no torch imported)."""

from __future__ import annotations

from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"""A directory holding none of these holds no tokenizer AutoTokenizer could load."""
MODEL_CONFIG = "config.json"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def holds_tokenizer(directory: str | Path) -> bool:
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def is_adapter_directory(directory: str | Path) -> bool:
    """Whether a directory holds a peft adapter and no full model config (a LoRA run's `final/`)."""
    return (Path(directory) / ADAPTER_CONFIG).is_file() and not (Path(directory) / MODEL_CONFIG).is_file()
