"""Tokenizers built here (never downloaded), loaded back through AutoTokenizer as a user's would be.

`byte_tokenizer`: byte-level BPE with no merges, so every character of ASCII text is one token and a
test can count positions by hand. Specials: <|pad|>=0, <|bos|>=1 (prepended to plain text),
<|endoftext|>=2, <|im_start|>=3, <|im_end|>=4 (EOS; a ChatML template writes it after every turn).

`bpe_tokenizer`: the same with merges learnt from a few hundred short strings, so tokens span several
characters (and may merge across a boundary a naive encoder would split at).
"""

from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPECIALS = ["<|pad|>", "<|bos|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = ["the", "sky", "is", "blue", "green", "red", "what", "color", "where", "sun", "sea", "hello", "world",
         "answer", "question", "paris", "capital", "france", "two", "plus", "four", "of", "a", "an", "yes",
         "no"]


def training_strings() -> list[str]:
    return [f"{a} {b} {c}?" for a in WORDS for b in WORDS[:8] for c in WORDS[:2]]


def build_tokenizer(directory: Path, *, merges: bool) -> PreTrainedTokenizerFast:
    """Train (or not) a byte-level BPE, save it with a ChatML template, and load it with AutoTokenizer."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab_size = 400 if merges else len(alphabet) + len(SPECIALS)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=alphabet)
    core.train_from_iterator(training_strings(), trainer)
    core.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 1)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|bos|>", eos_token="<|im_end|>",
                                      pad_token="<|pad|>")
    wrapped.chat_template = CHATML
    wrapped.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="session")
def byte_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    return build_tokenizer(tmp_path_factory.mktemp("byte_tokenizer"), merges=False)


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    return build_tokenizer(tmp_path_factory.mktemp("bpe_tokenizer"), merges=True)
