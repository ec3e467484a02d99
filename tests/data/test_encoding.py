"""Masks are checked by position on `byte_tokenizer`, where each ASCII character is one token and
<|bos|>=1, <|im_start|>=3, <|im_end|>=4 (EOS) are one token each."""

import copy
import json
import re
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, LlamaConfig

from posttrain.data import (
    DataError,
    ListwiseExample,
    LoadReport,
    PreferenceExample,
    PreferenceTokens,
    PromptExample,
    PromptTokens,
    SFTExample,
    UnpairedExample,
    check_positions,
    collate_completions,
    encode_listwise,
    encode_preference,
    encode_prompt,
    encode_prompts,
    encode_sft,
    encode_sft_example,
    encode_unpaired,
    load_examples,
)
from posttrain.data.encoding import fit_sft

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


# --- a huge text is cut before it is tokenised (issue #21, item 7) -----------------------------------------

class CountingTokenizer:
    """The tokenizer, recording the length of every text it is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def __call__(self, text, **options):
        self.lengths.append(len(text))
        return self.tokenizer(text, **options)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_huge_text_is_cut_before_it_is_tokenised_and_still_counted(bpe_tokenizer):
    # a 50 MB row was tokenised whole (19 GB peak) to keep 512 tokens of it
    huge = "the sky is blue " * 25_000  # 400,000 characters
    ids = lambda text, specials: bpe_tokenizer(text, add_special_tokens=specials)["input_ids"]  # the whole text
    counting = CountingTokenizer(bpe_tokenizer)
    report = LoadReport()
    sft = encode_sft([SFTExample("what color?", huge, "a"), SFTExample(None, huge, "b")], counting, max_length=32,
                     report=report)
    prompts = encode_prompts([PromptExample(huge + "what color?", "c")], counting, max_length=32, report=report)
    pairs = encode_preference([PreferenceExample("q", huge, " red", "d")], counting, max_length=32, report=report)
    assert max(counting.lengths) < 10_000
    assert sft[0].input_ids == (ids("what color?", True) + ids(huge, False))[:32]
    assert sft[1].input_ids == ids(huge, True)[:32]
    assert prompts[0].prompt_ids == ids(huge + "what color?", True)[-32:]
    assert pairs[0].chosen_ids == ids(huge, False)[:32 - len(ids("q", True))]
    assert report.truncated == 4 and report.dropped == 0
    report = LoadReport()
    assert encode_sft([SFTExample(None, huge, "b")], counting, max_length=32, truncation="drop", report=report) == []
    assert report.dropped == 1


def test_a_huge_turn_of_a_conversation_is_cut_before_it_is_tokenised(bpe_tokenizer):
    huge = {"role": "assistant", "content": "the sky is blue " * 100_000}
    messages = [USER_HI, huge, USER_OK, ASSISTANT_NO]
    counting = CountingTokenizer(bpe_tokenizer)
    whole = encode_sft_example(bpe_tokenizer, SFTExample(None, messages, "r"))  # not cut: the plain encoding
    cut = encode_sft([SFTExample(None, messages, "r")], counting, max_length=40)[0]
    assert max(counting.lengths) < 20_000
    assert (cut.input_ids, cut.loss_mask) == (whole.input_ids[:40], whole.loss_mask[:40])


WORD = st.sampled_from(["the", "sky", "is", "blue", "sea", "hello", "world", "aaaa", "2+2=", "?", "\n", "  ", "héllo"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(WORD, min_size=1, max_size=40), repeat=st.integers(min_value=1, max_value=300),
       separator=st.sampled_from(["", " ", "\n"]), max_length=st.integers(min_value=1, max_value=80),
       truncation=st.sampled_from(["truncate", "drop"]))
def test_cutting_before_tokenising_keeps_the_tokens_of_the_whole_text(bpe_tokenizer, words, repeat, separator,
                                                                       max_length, truncation):
    # the plain path: each text tokenised whole (max_length=None), then fitted as before; texts over
    # CHARS_PER_TOKEN_GUESS * (max_length + CUT_MARGIN_TOKENS) characters (520 to 1152 here) are cut
    text = separator.join(words * repeat)
    examples = [SFTExample("q", text, "a"), SFTExample(None, text, "b"),
                SFTExample(None, [USER_HI, {"role": "assistant", "content": text}], "c")]
    plain_report, cut_report = LoadReport(), LoadReport()
    plain = [fit_sft(encode_sft_example(bpe_tokenizer, e), max_length, truncation, plain_report) for e in examples]
    cut = encode_sft(examples, bpe_tokenizer, max_length=max_length, truncation=truncation, report=cut_report)
    assert cut == [t for t in plain if t is not None]
    assert (cut_report.truncated, cut_report.dropped) == (plain_report.truncated, plain_report.dropped)
    prompt = encode_prompts([PromptExample(text, "p")], bpe_tokenizer, max_length=max_length)
    assert prompt == [PromptTokens(encode_prompt(bpe_tokenizer, text, where="p")[-max_length:], "p", prompt=text)]


# --- equal pairs have no preference to learn (issue #21, item 7) -------------------------------------------

def test_a_pair_whose_chosen_and_rejected_are_equal_is_named_or_skipped(byte_tokenizer):
    pairs = [PreferenceExample("sky", " blue", " red", "a"), PreferenceExample("sky", " blue", " blue", "b"),
             PreferenceExample([USER_HI], [ASSISTANT_YO], [dict(ASSISTANT_YO)], "c")]
    with pytest.raises(DataError, match=r"^b: 'chosen' and 'rejected' are the same tokens; equal completions have "
                                        r"no preference to learn \(their loss has a zero gradient\)$"):
        encode_preference(pairs, byte_tokenizer)
    report = LoadReport()
    assert [p.where for p in encode_preference(pairs, byte_tokenizer, on_bad_row="skip", report=report)] == ["a"]
    assert report.skipped == {"identical pair": 2}


def test_a_pair_equal_once_truncated_is_named_or_skipped(byte_tokenizer):
    # prompt <|bos|>sky = 4 tokens; max_length 8 leaves 4: " blu" of " blue" and of " blush"
    pair = PreferenceExample("sky", " blue", " blush", "r")
    with pytest.raises(DataError, match=r"^r: 'chosen' and 'rejected' are the same tokens once truncated to "
                                        r"max_length \(4 tokens each; a larger max_length keeps them apart\)"):
        encode_preference([pair], byte_tokenizer, max_length=8)
    report = LoadReport()
    assert encode_preference([pair], byte_tokenizer, max_length=8, on_bad_row="skip", report=report) == []
    assert (report.skipped, report.truncated) == ({"identical pair": 1}, 1)
    assert len(encode_preference([pair], byte_tokenizer, max_length=9)) == 1  # " blue" and " blus" differ


def test_a_listwise_row_whose_completions_are_all_equal_is_named(byte_tokenizer):
    same = ListwiseExample("q", [" a", " a", " a"], [1.0, 0.0, 2.0], "r")
    with pytest.raises(DataError, match=r"^r: all completions are the same tokens"):
        encode_listwise([same], byte_tokenizer)
    two_equal = ListwiseExample("q", [" a", " a", " b"], [1.0, 0.0, 2.0], "s")  # still ranks " b" against " a"
    assert len(encode_listwise([two_equal], byte_tokenizer)) == 1


# --- sequences longer than the model's positions (issue #21, item 7) ---------------------------------------

def test_lengths_past_the_model_positions_are_refused_naming_both():
    config = LlamaConfig(max_position_embeddings=64)
    check_positions(config, {"data.max_length": 64})
    message = ("data.max_length=65 tokens is more than the model's 64 positions (max_position_embeddings in its "
               "config); a position past them was never trained: set data.max_length to at most 64")
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        check_positions(config, {"data.max_length": 65})
    with pytest.raises(DataError, match=re.escape("rl.max_prompt_length=48 + rl.sampling.max_new_tokens=17 = 65 tokens "
                                                  "is more than the model's 64 positions")):
        check_positions(config, {"rl.max_prompt_length": 48, "rl.sampling.max_new_tokens": 17})
    # a RoPE scaling factor without original_max_position_embeddings extends the 64 positions to 128
    scaled = LlamaConfig(max_position_embeddings=64, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                      "rope_theta": 10000.0})
    check_positions(scaled, {"data.max_length": 128})
    with pytest.raises(DataError, match="129 tokens is more than the model's 128 positions"):
        check_positions(scaled, {"data.max_length": 129})


def test_sft_tokens_kept_take_about_twice_the_size_of_the_file(tmp_path: Path, byte_tokenizer):
    rows = [{"prompt": f"{i % 100}+{i % 7}=", "completion": str(i % 100 + i % 7)} for i in range(5_000)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # about 37 bytes a row
    examples, _ = load_examples(path, "sft")
    tracemalloc.start()
    tokens = encode_sft(examples, byte_tokenizer)
    kept = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    # row 4,999: "99+1=" (4,999 = 49 * 100 + 99 = 714 * 7 + 1), "100": BOS, 5 + 3 characters, EOS; targets the
    # completion and EOS
    ids = byte_tokenizer("99+1=100", add_special_tokens=False)["input_ids"]
    assert len(tokens) == 5_000 and tokens[4_999].input_ids == [1, *ids, 4]
    assert tokens[4_999].loss_mask == [False] * 6 + [True] * 4
    # lists of ids kept about 10 times the file: 56 (SFTTokens) + 2 x (56 + 8 x 10) (two lists of 10) + about 80
    # (where) bytes a row; as bytes, 10 ids of 5 bytes, 10 flags of 1, a few for the lists and where, an offset of 8
    assert kept < 3 * path.stat().st_size
