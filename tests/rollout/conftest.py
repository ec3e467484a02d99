"""Tiny random causal LMs (float32, CPU) shared by the rollout and env tests."""

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

VOCAB = 64
# a larger init spread than the default 0.02 gives peaked next-token distributions, so greedy argmaxes
# are far from ties and do not flip under batch-shape-dependent float rounding
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    initializer_range=0.2,
)


def build_qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**SHAPE)).eval()


def build_llama() -> LlamaForCausalLM:
    torch.manual_seed(1)
    return LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()


@pytest.fixture(scope="session")
def qwen2_model() -> Qwen2ForCausalLM:
    return build_qwen2()


@pytest.fixture(scope="session")
def llama_model() -> LlamaForCausalLM:
    return build_llama()


@pytest.fixture(scope="session", params=["qwen2", "llama"])
def tiny_model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return build_qwen2() if request.param == "qwen2" else build_llama()


@pytest.fixture(scope="session")
def char_tokenizer() -> PreTrainedTokenizerFast:
    """One character per token id: id i <-> chr(ord('0') + i), so ids 0..63 decode to '0'..'o'.

    Ids 64..74 ('p'..'z') are never generated; transformers' stop-string matcher tokenises a lowercase
    alphabet prefix, so the vocabulary must hold every letter and split text per character.
    """
    vocab = {chr(ord("0") + i): i for i in range(VOCAB + 11)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="0"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # text -> one token per char
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture
def prompts() -> list[list[int]]:
    """Prompt lengths 3, 7, 1, 5: one batch needs left padding of up to 6 tokens."""
    return [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15, 16]]
