"""`model.chat_template` (issue #25.4, TRL's chat_template_path): a template replacing the tokenizer's own, given
as Jinja text or a file; conversational rows are rendered with it and final/ keeps it."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from posttrain.api import sft
from posttrain.config import ConfigError
from posttrain.tasks import build_builtin_tokenizer
from posttrain.trainers.build import set_chat_template

# a template of its own: "[role] content" lines, the assistant's ended by EOS
TEMPLATE = ("{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] }}{% if m['role'] == 'assistant' %}"
            "{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '[assistant] ' }}"
            "{% endif %}")  # fmt: skip
CHAT = [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]


def test_text_or_a_file_beside_the_recipe_replaces_the_template_and_a_bad_value_is_one_line(tmp_path: Path) -> None:
    tokenizer = build_builtin_tokenizer("arithmetic")
    set_chat_template(tokenizer, TEMPLATE, None)
    assert tokenizer.apply_chat_template(CHAT, tokenize=False) == "[user] 2+2=\n[assistant] 4<|im_end|>\n"
    (tmp_path / "chat.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    set_chat_template(tokenizer, "chat.jinja", str(tmp_path))
    assert tokenizer.apply_chat_template(CHAT, tokenize=False) == "2+2=4"
    with pytest.raises(ConfigError, match=r"model.chat_template: 'missing\.jinja' is no file"):
        set_chat_template(tokenizer, "missing.jinja", str(tmp_path))


def test_sft_renders_conversations_with_it_and_final_keeps_it(tmp_path: Path) -> None:
    (tmp_path / "chat.jinja").write_text(TEMPLATE)
    rows = [{"messages": [{"role": "user", "content": f"{a}+{a}="}, {"role": "assistant", "content": str(2 * a)}]}
            for a in range(10)]  # fmt: skip
    model = {"preset": "qwen2-tiny", "tokenizer": "arithmetic", "chat_template": str(tmp_path / "chat.jinja")}
    config = {"model": model,
              "data": {"train": "in-memory", "max_length": 32}, "train": {"max_steps": 1, "batch_size": 4},
              "log": {"to": []}, "output_dir": str(tmp_path / "run")}  # fmt: skip
    result = sft(config, train=rows, progress=False)
    assert result.tokenizer.chat_template == TEMPLATE
    saved = AutoTokenizer.from_pretrained(result.final_dir)
    assert saved.apply_chat_template(CHAT, tokenize=False) == "[user] 2+2=\n[assistant] 4<|im_end|>\n"
    # the trained targets were the template's: "4" then EOS after "[assistant] " (not ChatML's <|im_start|>)
    from posttrain.data import SFTExample, encode_sft

    (tokens,) = encode_sft([SFTExample(None, CHAT, "row 1")], result.tokenizer)
    targets = [t for t, m in zip(tokens.input_ids, tokens.loss_mask) if m]
    assert result.tokenizer.decode(targets) == "4<|im_end|>"
    assert "<|im_start|>" not in result.tokenizer.decode(tokens.input_ids)
