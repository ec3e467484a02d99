"""Tiny tokenizers built with the project's own builder, given real chat templates and the markup tokens of the
models that use them (added the way those models have them: control tokens special, Qwen's tags plain)."""

from functools import cache

from tests.envs import templates

from posttrain.tasks import build_tokenizer

CORPUS = [
    '{"name": "calculator", "arguments": {"expression": "12*34"}}', '{"name": "calculator", "parameters": {}}',
    "Guess my number between 1 and 16. higher lower correct", "I need the calculator. The answer is 408.",
] * 20


@cache
def family_tokenizer(family: str):
    tok = build_tokenizer(CORPUS, vocab_size=512)
    if family in ("qwen2_5", "qwen3"):
        tok.add_tokens(["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"])
        tok.chat_template = templates.QWEN2_5 if family == "qwen2_5" else templates.QWEN3
    elif family == "llama3_1":
        tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>",
                                                              "<|eom_id|>", "<|python_tag|>"]})
        tok.chat_template = templates.LLAMA3_1
    elif family == "mistral":
        tok.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>",
                                "additional_special_tokens": ["[INST]", "[/INST]", "[TOOL_CALLS]",
                                                              "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                                                              "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]})
        tok.chat_template = templates.MISTRAL_V3
    else:
        raise ValueError(family)
    return tok
