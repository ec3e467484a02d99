"""Masks are checked by position on `byte_tokenizer`, where each ASCII character is one token and
<|bos|>=1, <|im_start|>=3, <|im_end|>=4 (EOS) are one token each."""

import copy
import tempfile

import pytest
from transformers import AutoTokenizer

from posttrain.data import (
    DataError,
    ListwiseExample,
    LoadReport,
    PreferenceExample,
    PreferenceTokens,
    PromptExample,
    SFTExample,
    UnpairedExample,
    collate_completions,
    encode_listwise,
    encode_preference,
    encode_prompt,
    encode_prompts,
    encode_sft,
    encode_sft_example,
    encode_unpaired,
)

USER_HI = {"role": "user", "content": "hi"}
ASSISTANT_YO = {"role": "assistant", "content": "yo"}
USER_OK = {"role": "user", "content": "ok"}
ASSISTANT_NO = {"role": "assistant", "content": "no"}


def targets(tokens) -> list[int]:
    return [t for t, m in enumerate(tokens.loss_mask) if m]


def test_tokenizer_round_trips_through_auto_tokenizer(bpe_tokenizer):
    text = "what color is the sky? blue, and the sea"
    assert bpe_tokenizer.decode(bpe_tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    with tempfile.TemporaryDirectory() as directory:
        bpe_tokenizer.save_pretrained(directory)
        reloaded = AutoTokenizer.from_pretrained(directory)
    assert reloaded(text)["input_ids"] == bpe_tokenizer(text)["input_ids"]
    assert reloaded.chat_template == bpe_tokenizer.chat_template


def test_text_completion_is_the_only_target_and_ends_with_eos(byte_tokenizer):
    tokens = encode_sft_example(byte_tokenizer, SFTExample("2+2=", " 4", "r"))
    # <|bos|> 2 + 2 = | ' ' 4 <|im_end|>   -> prompt 0..4, completion 5..7
    assert tokens.input_ids[:5] == encode_prompt(byte_tokenizer, "2+2=", where="r")
    assert byte_tokenizer.decode(tokens.input_ids) == "<|bos|>2+2= 4<|im_end|>"
    assert targets(tokens) == [5, 6, 7]
    everything = encode_sft_example(byte_tokenizer, SFTExample("2+2=", " 4", "r"), completion_only=False)
    assert targets(everything) == [1, 2, 3, 4, 5, 6, 7]  # position 0 is never a target


def test_eos_is_not_doubled_and_plain_text_trains_every_token(byte_tokenizer):
    tokens = encode_sft_example(byte_tokenizer, SFTExample("q", " a<|im_end|>", "r"))
    assert byte_tokenizer.decode(tokens.input_ids) == "<|bos|>q a<|im_end|>"
    plain = encode_sft_example(byte_tokenizer, SFTExample(None, "hi", "r"))
    assert plain.input_ids == [1, *byte_tokenizer("hi", add_special_tokens=False)["input_ids"], 4]
    assert plain.loss_mask == [False, True, True, True]


def test_text_prompt_ids_are_not_retokenised_with_the_completion(bpe_tokenizer):
    prompt, completion = "what is the", " sky blue"
    tokens = encode_sft_example(bpe_tokenizer, SFTExample(prompt, completion, "r"))
    prompt_ids = bpe_tokenizer(prompt)["input_ids"]
    assert tokens.input_ids[:len(prompt_ids)] == prompt_ids
    assert bpe_tokenizer.decode(tokens.input_ids[len(prompt_ids):]) == " sky blue<|im_end|>"
    assert targets(tokens) == list(range(len(prompt_ids), len(tokens.input_ids)))


def test_every_assistant_turn_is_a_target_up_to_its_eos(byte_tokenizer):
    chat = [USER_HI, ASSISTANT_YO, USER_OK, ASSISTANT_NO]
    tokens = encode_sft_example(byte_tokenizer, SFTExample(None, chat, "r"))
    # "<|im_start|>user\nhi<|im_end|>\n"   10 tokens  0..9
    # "<|im_start|>assistant\n"            11 tokens 10..20
    # "yo<|im_end|>" targets 21..23, "\n" 24 is context
    # "<|im_start|>user\nok<|im_end|>\n"   10 tokens 25..34
    # "<|im_start|>assistant\n"            11 tokens 35..45
    # "no<|im_end|>" targets 46..48, "\n" 49
    assert len(tokens.input_ids) == 50
    assert targets(tokens) == [21, 22, 23, 46, 47, 48]
    assert byte_tokenizer.decode([tokens.input_ids[t] for t in targets(tokens)]) == "yo<|im_end|>no<|im_end|>"


def test_conversational_prompt_completion_trains_the_completion_turns_only(byte_tokenizer):
    example = SFTExample([USER_HI, ASSISTANT_YO, USER_OK], [ASSISTANT_NO], "r")
    assert targets(encode_sft_example(byte_tokenizer, example)) == [46, 47, 48]


def test_merged_tokens_keep_the_assistant_mask(bpe_tokenizer):
    chat = [{"role": "user", "content": "what color is the sky?"},
            {"role": "assistant", "content": "the sky is blue"}]
    tokens = encode_sft_example(bpe_tokenizer, SFTExample(None, chat, "r"))
    assert bpe_tokenizer.decode([tokens.input_ids[t] for t in targets(tokens)]) == "the sky is blue<|im_end|>"


def test_eos_appended_when_the_template_does_not_write_it(byte_tokenizer):
    tokenizer = copy.deepcopy(byte_tokenizer)
    tokenizer.eos_token = "<|endoftext|>"
    tokens = encode_sft_example(tokenizer, SFTExample(None, [USER_HI, ASSISTANT_YO], "r"))
    # 25 rendered tokens as above, then <|endoftext|> (id 2); the turn "yo<|im_end|>\n" is 21..24
    assert tokens.input_ids[-1] == 2 and len(tokens.input_ids) == 26
    assert targets(tokens) == [21, 22, 23, 24, 25]


@pytest.mark.parametrize("template", [None, ""])
def test_missing_chat_template_is_a_clear_error(byte_tokenizer, template):
    # an empty template counts as none: it rendered every conversation to nothing, with no error (audit)
    tokenizer = copy.deepcopy(byte_tokenizer)
    tokenizer.chat_template = template
    with pytest.raises(DataError, match=r"d\.jsonl line 2: the row is conversational but the tokenizer has "
                                        r"no chat_template"):
        encode_sft([SFTExample(None, [USER_HI, ASSISTANT_YO], "d.jsonl line 2")], tokenizer)
    assert encode_sft([SFTExample("q", "a", "r")], tokenizer)[0].input_ids[0] == 1  # text needs no template


def test_template_that_rewrites_earlier_turns_is_reported(byte_tokenizer):
    tokenizer = copy.deepcopy(byte_tokenizer)
    tokenizer.chat_template = "{{ messages | length }}" + tokenizer.chat_template
    with pytest.raises(DataError, match="r: the chat template does not render this conversation's prefix"):
        encode_sft_example(tokenizer, SFTExample(None, [USER_HI, ASSISTANT_YO], "r"))


def test_sft_truncation_keeps_the_start_and_counts(byte_tokenizer):
    examples = [SFTExample("2+2=", " 4", "a"), SFTExample("q", " a", "b")]  # 8 and 5 tokens
    report = LoadReport()
    kept = encode_sft(examples, byte_tokenizer, max_length=6, report=report)
    ids = lambda text: byte_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert [t.input_ids for t in kept] == [[1, *ids("2+2= ")], [1, *ids("q a"), 4]]
    assert kept[0].loss_mask == [False] * 5 + [True]
    assert (report.truncated, report.dropped) == (1, 0)
    # at 5 tokens nothing of the first completion is left: dropped, not truncated
    report = LoadReport()
    assert [t.where for t in encode_sft(examples, byte_tokenizer, max_length=5, report=report)] == ["b"]
    assert (report.truncated, report.dropped) == (0, 1)
    report = LoadReport()
    assert [t.where for t in encode_sft(examples, byte_tokenizer, max_length=6, truncation="drop",
                                        report=report)] == ["b"]
    assert (report.truncated, report.dropped) == (0, 1)


def test_preference_keeps_the_prompt_and_cuts_completions(byte_tokenizer):
    # prompt <|bos|>sky = 4 tokens; " blue"+EOS = 6; " red"+EOS = 5; max_length 8 leaves room 4
    pairs = [PreferenceExample("sky", " blue", " red", "a"),
             PreferenceExample("a long prompt", " x", " y", "b")]
    report = LoadReport()
    encoded = encode_preference(pairs, byte_tokenizer, max_length=8, report=report)
    assert encoded == [PreferenceTokens(encode_prompt(byte_tokenizer, "sky", where="a"),
                                        byte_tokenizer(" blu", add_special_tokens=False)["input_ids"],
                                        byte_tokenizer(" red", add_special_tokens=False)["input_ids"], "a")]
    assert (report.truncated, report.dropped) == (1, 1)


def test_conversational_preference_completion_ends_at_eos(byte_tokenizer):
    pair = PreferenceExample([USER_HI], [ASSISTANT_YO], [ASSISTANT_NO], "r")
    tokens = encode_preference([pair], byte_tokenizer)[0]
    prompt_text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert byte_tokenizer.decode(tokens.prompt_ids) == prompt_text
    assert byte_tokenizer.decode(tokens.chosen_ids) == "yo<|im_end|>"
    assert byte_tokenizer.decode(tokens.rejected_ids) == "no<|im_end|>"


def test_unpaired_and_listwise_rows_with_groups(byte_tokenizer):
    unpaired = encode_unpaired([UnpairedExample("q", " a", True, "r")], byte_tokenizer)
    listwise = encode_listwise([ListwiseExample("q", [" a", " bb"], [1.0, 0.0], "r")], byte_tokenizer)
    assert unpaired[0].label is True and listwise[0].scores == [1.0, 0.0]
    batch, group_B = collate_completions([*unpaired, *listwise], pad_id=0)
    # rows: <bos> q ' ' a EOS | <bos> q ' ' a EOS | <bos> q ' ' b b EOS
    assert group_B.tolist() == [0, 1, 1]
    assert batch.loss_mask_B_T.int().tolist() == [[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert batch.num_target_tokens == 10


def test_prompts_keep_their_end_and_extra_columns(byte_tokenizer):
    report = LoadReport()
    prompts = [PromptExample("abcdef", "a", {"answer": "4"}), PromptExample([USER_HI], "b", {})]
    encoded = encode_prompts(prompts, byte_tokenizer, max_length=21, report=report)
    assert encoded[0].prompt_ids == [1, *byte_tokenizer("abcdef", add_special_tokens=False)["input_ids"]]
    assert encoded[0].extra == {"answer": "4"}
    assert byte_tokenizer.decode(encoded[1].prompt_ids).endswith("<|im_start|>assistant\n")
    short = encode_prompts(prompts[:1], byte_tokenizer, max_length=4, report=report)
    assert byte_tokenizer.decode(short[0].prompt_ids) == "cdef"
    assert report.truncated == 1
    assert encode_prompts(prompts[:1], byte_tokenizer, max_length=4, truncation="drop", report=report) == []
    assert report.dropped == 1
