"""A small byte-level BPE tokenizer the project builds itself (no download).

Digits are always split into single tokens, so the arithmetic task's numbers are spelled digit by
digit: a tiny model learns column arithmetic far more easily than over BPE digit chunks.

It is saved as a normal Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json with a
ChatML chat template) and loads back through `AutoTokenizer.from_pretrained`. DESIGN.md records why it
is byte-level: transformers 5 picks the tokenizer class from a model's `model_type`, and a
character-level tokenizer saved beside a qwen2 config silently lost its spaces; a byte-level BPE
round-trips (tests/tasks/test_tokenizer.py holds it to that).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = (PAD, BOS, EOS)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TOOLS_CHATML_TEMPLATE = (
    "{% if tools %}<|im_start|>system\ntools:{% for tool in tools %} {{ tool.function.name }}{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'assistant' %}<|im_start|>assistant\n{{ message.content }}"
    "{% for call in message.tool_calls or [] %}<tool_call>"
    "{{ {'name': call.function.name, 'arguments': call.function.arguments} | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n"
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""ChatML with tools, compact enough for a tiny model: the tools' names in a system line, calls as Hermes'
`<tool_call>{"name": ..., "arguments": ...}</tool_call>` (the `hermes` parser reads them), results as `tool`
turns. The `arithmetic-tools` tokenizer carries it."""
TOOL_TOKENS = ("<tool_call>", "</tool_call>")

_BASE_CORPUS = (
    "The quick brown fox jumps over the lazy dog. What is the answer? Let me think step by step.",
    "<think> add the ones, carry the tens </think> <answer> 42 </answer>",
    "system user assistant tool You are a helpful assistant. Compute the result.",
)


def build_tokenizer(corpus: Iterable[str] = (), *, vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus` (plus a small built-in corpus) with single-digit tokens.

    vocab_size counts the 256 byte tokens and the 3 special tokens; the rest are BPE merges.
    """
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*_BASE_CORPUS, *corpus], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHATML_TEMPLATE,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


CHARACTERS_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
"""The byte alphabet and the special tokens, no merges: the `characters` tokenizer."""


def build_characters_tokenizer(corpus: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """The byte-level tokenizer of the task suite (reverse, sort, count, sequence): no merges, so every ASCII
    character is one token, which tasks that move characters around need. With no merges, any pre-tokenizer
    gives the same ids, so the one transformers substitutes beside a model's config (DESIGN.md pitfalls) cannot
    change them."""
    return build_tokenizer(corpus, vocab_size=CHARACTERS_VOCAB_SIZE)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> Path:
    directory = Path(directory)
    tokenizer.save_pretrained(directory)
    return directory
