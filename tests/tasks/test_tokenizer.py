"""The project's byte-level BPE tokenizer: single-digit tokens, a chat template, AutoTokenizer round trip."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, Qwen2Config

from posttrain.tasks import ArithmeticTask, build_tokenizer, save_tokenizer
from posttrain.tasks.tokenizer import BOS, EOS, PAD

TEXTS = ["12 + 3 = 15", "37+58=95", "  two  spaces\tand a tab\n", "-7", "What is 100*25? 2500"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(ArithmeticTask(digits=3, operators="+-*").corpus(300))


def test_digits_are_single_tokens(tokenizer) -> None:
    for digit in "0123456789":
        assert len(tokenizer.encode(digit, add_special_tokens=False)) == 1
    ids = tokenizer.encode("1234567890", add_special_tokens=False)
    assert len(ids) == 10
    assert [tokenizer.decode([i]) for i in ids] == list("1234567890")
    # "37+58=95" -> 3 7 + 5 8 = 9 5 with '+' and '=' at most merged with each other, never with digits
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("37+58=95", add_special_tokens=False)]
    assert "".join(pieces) == "37+58=95"
    assert all(not (any(c.isdigit() for c in p) and len(p) > 1) for p in pieces)


def test_special_tokens(tokenizer) -> None:
    assert tokenizer.pad_token == PAD and tokenizer.bos_token == BOS and tokenizer.eos_token == EOS
    ids = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
    assert len(ids) == 3 and ids <= {0, 1, 2}  # trained first, in SPECIAL_TOKENS order
    assert tokenizer.encode(EOS, add_special_tokens=False) == [tokenizer.eos_token_id]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_is_exact(tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_chat_template(tokenizer) -> None:
    messages = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\n1+1=<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\n1+1=<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("model_config", [None, "qwen2"])
def test_round_trip_through_auto_tokenizer(tokenizer, tmp_path: Path, model_config: str | None) -> None:
    """DESIGN.md pitfall: beside a qwen2 config.json transformers picks Qwen2Tokenizer; spaces must survive."""
    save_tokenizer(tokenizer, tmp_path)
    if model_config == "qwen2":
        Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
        ).save_pretrained(tmp_path)
        assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen2"
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for text in TEXTS:
        ids = loaded.encode(text, add_special_tokens=False)
        assert ids == tokenizer.encode(text, add_special_tokens=False)
        assert loaded.decode(ids) == text
    assert loaded.decode(loaded.encode("12 + 3 = 15", add_special_tokens=False)) == "12 + 3 = 15"
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == (PAD, BOS, EOS)
    assert loaded.chat_template == tokenizer.chat_template


def test_building_twice_gives_the_same_vocabulary(tokenizer) -> None:
    again = build_tokenizer(ArithmeticTask(digits=3, operators="+-*").corpus(300))
    assert again.get_vocab() == tokenizer.get_vocab()
    assert len(again) == len(tokenizer)


def test_vocab_size_counts_bytes_and_special_tokens() -> None:
    # 256 byte tokens + 3 special tokens = 259 is the floor; vocab_size=300 leaves at most 41 merges
    small = build_tokenizer(["aaaa bbbb"] * 5, vocab_size=300)
    assert 259 <= len(small) <= 300
