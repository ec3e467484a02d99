"""A TRL user's data habits (issue #25.4): implicit-prompt text pairs split as TRL's `extract_prompt` splits them,
so that length-normalised losses see the completions only; paired rows unpaired for KTO and BCO as TRL's KTO
trainer unpairs them; pref.max_prompt_length; and multi-turn SFT under a template that rewrites earlier turns
(Qwen3 drops their reasoning), rendered per assistant turn."""

from __future__ import annotations

import pytest

from posttrain.data import (
    LoadReport,
    PreferenceExample,
    Row,
    SFTExample,
    UnpairedExample,
    encode_preference,
    encode_sft,
    validate_rows,
)
from posttrain.data.examples import split_text_prompt
from posttrain.tasks import build_builtin_tokenizer

TOKENIZER = build_builtin_tokenizer("arithmetic")


def rows(*fields: dict) -> list[Row]:
    return [Row(f, f"d.jsonl line {i + 1}") for i, f in enumerate(fields)]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize(
    ("chosen", "rejected", "expected"),
    [
        # the first difference is at "b"/"g" (index 11); the space before it starts both completions
        ("The sky is blue.", "The sky is green.", ("The sky is", " blue.", " green.")),
        ("12+3=15", "12+3=16", ("12+3=1", "5", "6")),
        ("abc", "xyz", ("", "abc", "xyz")),
        # one a prefix of the other: the shorter's last character starts the completions
        ("2+2=4", "2+2=44", ("2+2=", "4", "44")),
    ],
)
def test_an_implicit_text_prompt_is_the_shared_prefix_less_its_last_space(chosen, rejected, expected) -> None:
    assert split_text_prompt(chosen, rejected) == expected


def test_the_split_is_trls_extract_prompt() -> None:
    data_utils = pytest.importorskip("trl.data_utils")
    for chosen, rejected in [("The sky is blue.", "The sky is green."), ("12+3=15", "12+3=16"),
                             ("Q: 7*8? A: 56", "Q: 7*8? A: 54"), ("2+2=4", "2+2=44"), ("a b c", "a b d")]:  # fmt: skip
        theirs = data_utils.extract_prompt({"chosen": chosen, "rejected": rejected})
        assert split_text_prompt(chosen, rejected) == (theirs["prompt"], theirs["chosen"], theirs["rejected"])


def test_an_implicit_text_pair_trains_its_completions_only() -> None:
    (pair,) = validate_rows(rows({"chosen": "The sky is blue.", "rejected": "The sky is green."}), "preference")
    assert pair == PreferenceExample("The sky is", " blue.", " green.", "d.jsonl line 1")
    (tokens,) = encode_preference([pair], TOKENIZER)
    # the prompt's tokens are context; a length-normalised loss divides by the completion's tokens (+ EOS) only
    assert tokens.prompt_ids == TOKENIZER("The sky is")["input_ids"]
    assert tokens.chosen_ids == [*TOKENIZER(" blue.", add_special_tokens=False)["input_ids"], TOKENIZER.eos_token_id]
    # text pairs that share nothing keep no prompt, as before
    (apart,) = validate_rows(rows({"chosen": "yes", "rejected": "no"}), "preference")
    assert apart.prompt is None


def test_paired_rows_are_unpaired_for_kto_and_bco_as_trl_does() -> None:
    paired = rows(
        {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
        {"chosen": [user("3+3="), assistant("6")], "rejected": [user("3+3="), assistant("7")]},
        {"chosen": "1+1=2", "rejected": "1+1=3"},
        {"prompt": "9-1=", "completion": "8", "label": True},  # already unpaired: as it is
    )
    report = LoadReport()
    examples = validate_rows(paired, "unpaired", report=report)
    assert examples == [
        UnpairedExample("2+2=", "4", True, "d.jsonl line 1 (chosen)"),
        UnpairedExample("2+2=", "5", False, "d.jsonl line 1 (rejected)"),
        UnpairedExample([user("3+3=")], [assistant("6")], True, "d.jsonl line 2 (chosen)"),
        UnpairedExample([user("3+3=")], [assistant("7")], False, "d.jsonl line 2 (rejected)"),
        UnpairedExample("1+1=", "2", True, "d.jsonl line 3 (chosen)"),
        UnpairedExample("1+1=", "3", False, "d.jsonl line 3 (rejected)"),
        UnpairedExample("9-1=", "8", True, "d.jsonl line 4"),
    ]
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    pairs = Dataset.from_list([{"prompt": "2+2=", "chosen": "4", "rejected": "5"},
                               {"prompt": "3+3=", "chosen": "6", "rejected": "7"}])  # fmt: skip
    theirs = {(r["prompt"], r["completion"], r["label"]) for r in trl.unpair_preference_dataset(pairs)}
    ours = {(e.prompt, e.completion, e.label) for e in validate_rows(rows(*pairs), "unpaired")}
    assert ours == theirs


def test_max_prompt_length_keeps_a_prompts_last_tokens() -> None:
    prompt = "1+2+3+4+5="
    full = TOKENIZER(prompt)["input_ids"]
    assert len(full) > 4
    report = LoadReport()
    (tokens,) = encode_preference([PreferenceExample(prompt, "15", "16", "row 1")], TOKENIZER, max_prompt_length=4,
                                  max_length=64, report=report)  # fmt: skip
    assert tokens.prompt_ids == full[-4:] and report.truncated == 1
    untouched = encode_preference([PreferenceExample("2=", "2", "3", "row 2")], TOKENIZER, max_prompt_length=4)
    assert untouched[0].prompt_ids == TOKENIZER("2=")["input_ids"]


# A template of the kind Qwen3's is: the reasoning (<think>...</think>) of an assistant turn before the last user
# turn is dropped, so a conversation's prefixes do not render as prefixes of its whole rendering.
DROPS_EARLIER_THINKING = (
    "{%- set ns = namespace(last_user=0) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- set content = m.content %}"
    "{%- if m.role == 'assistant' and loop.index0 < ns.last_user and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1] %}{%- endif %}"
    "{{- '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TWO_TURNS = [user("1+1="), assistant("<think>1+1</think>2"), user("2+2="), assistant("<think>2+2</think>4")]


def targets(tokenizer, tokens) -> str:
    return tokenizer.decode([t for t, m in zip(tokens.input_ids, tokens.loss_mask) if m])


def test_a_template_that_rewrites_earlier_turns_trains_each_assistant_turn_in_its_own_context() -> None:
    tokenizer = build_builtin_tokenizer("arithmetic")
    tokenizer.chat_template = DROPS_EARLIER_THINKING
    first, second = encode_sft([SFTExample(None, TWO_TURNS, "row 1")], tokenizer)
    # turn 2 (the first answer) alone, its reasoning kept, as the model answers there
    assert tokenizer.decode(first.input_ids) == "<|im_start|>user\n1+1=<|im_end|>\n" \
        "<|im_start|>assistant\n<think>1+1</think>2<|im_end|>\n"  # fmt: skip
    assert targets(tokenizer, first) == "<think>1+1</think>2<|im_end|>"
    # turn 4 in the context the template gives it: the first answer without its reasoning, and not a target
    assert tokenizer.decode(second.input_ids).startswith(
        "<|im_start|>user\n1+1=<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n<|im_start|>user\n2+2=")
    assert targets(tokenizer, second) == "<think>2+2</think>4<|im_end|>"
    assert first.where == "row 1 (assistant turn 2)" and second.where == "row 1 (assistant turn 4)"


def test_a_template_that_renders_prefixes_keeps_one_sequence_per_conversation() -> None:
    (tokens,) = encode_sft([SFTExample(None, TWO_TURNS, "row 1")], TOKENIZER)  # ChatML: prefixes are prefixes
    assert targets(TOKENIZER, tokens) == "<think>1+1</think>2<|im_end|><think>2+2</think>4<|im_end|>"
