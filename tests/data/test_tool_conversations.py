"""SFT on tool-use conversations (TRL's `tools` column, assistant `tool_calls`, the `tool` role): the template gets
the tools, and only the assistant turns are trained, the very ids a tool episode samples."""

import json

import pytest
from tests.envs.tokenizers import family_tokenizer

from posttrain.data.encoding import encode_sft_example
from posttrain.data.errors import DataError
from posttrain.data.examples import validate_sft_row
from posttrain.data.readers import Row
from posttrain.envs.tool_env import CalculatorEnv

CALL = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "12*34"}}}
MESSAGES = [
    {"role": "user", "content": "What is 12*34?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "name": "calculator", "content": "408"},
    {"role": "assistant", "content": "408"},
]


def test_tool_turns_are_context_and_assistant_turns_are_targets():
    tok = family_tokenizer("qwen2_5")
    schema = CalculatorEnv(tok).toolset.schemas
    example = validate_sft_row(Row({"messages": MESSAGES, "tools": json.dumps(schema)}, "train.jsonl row 1"))
    assert example.tools == schema
    tokens = encode_sft_example(tok, example)
    text = tok.decode(tokens.input_ids)
    assert '"name": "calculator"' in text.split("<|im_start|>user")[0]  # the schema is in the system prompt
    trained = tok.decode([i for i, m in zip(tokens.input_ids, tokens.loss_mask) if m])
    # the two assistant turns with their end markers; never the tool's response or the prompt
    assert trained == ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*34"}}\n</tool_call>'
                       "<|im_end|>408<|im_end|>")  # fmt: skip
    # the same ids a calculator episode renders as its prompt, then samples
    env = CalculatorEnv(tok)
    prompt_ids = env.reset({"prompt": MESSAGES[:1]})
    assert tokens.input_ids[: len(prompt_ids)] == prompt_ids


def test_a_bad_tools_column_names_the_row():
    with pytest.raises(DataError, match=r"row 3: field 'tools': not JSON"):
        validate_sft_row(Row({"messages": MESSAGES, "tools": "[{"}, "row 3"))
    with pytest.raises(DataError, match=r"row 4: field 'tools': expected a list of function schemas"):
        validate_sft_row(Row({"messages": MESSAGES, "tools": {"name": "x"}}, "row 4"))
