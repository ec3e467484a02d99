"""Stepwise rows (TRL's stepwise supervision format): validation names the row and field, encoding puts each step's
label at its separator's last token, truncation keeps whole steps, collation marks the labelled positions.

The byte tokenizer makes every ASCII character one token and prepends <|bos|> (id 1) to a text prompt."""

from __future__ import annotations

import pytest

from posttrain.data import DataError, LoadReport, Row, validate_rows
from posttrain.data.stepwise import collate_stepwise, encode_stepwise, split_steps

ROW = {"prompt": "2+2=", "completions": ["ab", "cde"], "labels": [True, False]}


def validate(fields: dict, on_bad_row: str = "error", report: LoadReport | None = None) -> list:
    return validate_rows([Row(fields, "rows.jsonl row 3")], "stepwise", on_bad_row=on_bad_row, report=report)


def test_a_trl_stepwise_row_validates():
    (example,) = validate(ROW)
    assert (example.prompt, example.steps, example.labels) == ("2+2=", ["ab", "cde"], [True, False])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": [True]}, "rows.jsonl row 3: field 'labels': expected a list of 2 labels"),
        ({"labels": [True, 1]}, "rows.jsonl row 3: field 'labels\\[1\\]': expected true or false"),
        ({"completions": []}, "rows.jsonl row 3: field 'completions': expected a non-empty list of steps"),
        ({"completions": ["ab", " "]}, "rows.jsonl row 3: field 'completions\\[1\\]'"),
        ({"prompt": [{"role": "user", "content": "hi"}]}, "rows.jsonl row 3: field 'prompt': stepwise rows are text"),
    ],
)
def test_a_bad_stepwise_row_names_its_row_and_field(change, message):
    with pytest.raises(DataError, match=message):
        validate({**ROW, **change})


def test_a_row_without_labels_is_skipped_and_counted_when_asked():
    report = LoadReport()
    assert validate({"prompt": "x", "completions": ["a"]}, on_bad_row="skip", report=report) == []
    assert report.skipped["missing field"] == 1


def test_each_label_sits_at_its_steps_separator(byte_tokenizer):
    # "2+2=" -> <|bos|> 2 + 2 = (5 ids); steps "ab" + "\n", "cde" + "\n" -> a b \n c d e \n; ends at 2 and 6
    (example,) = validate(ROW)
    (tokens,) = encode_stepwise([example], byte_tokenizer, separator="\n")
    assert len(tokens.prompt_ids) == 5 and tokens.prompt_ids[0] == 1
    assert byte_tokenizer.decode(tokens.completion_ids) == "ab\ncde\n"
    assert tokens.step_ends == [2, 6] and tokens.labels == [True, False]
    newline = byte_tokenizer.convert_tokens_to_ids("Ċ")
    assert [tokens.completion_ids[end] for end in tokens.step_ends] == [newline, newline]


def test_an_empty_separator_labels_each_steps_own_last_token(byte_tokenizer):
    (example,) = validate(ROW)
    (tokens,) = encode_stepwise([example], byte_tokenizer, separator="")
    assert byte_tokenizer.decode(tokens.completion_ids) == "abcde" and tokens.step_ends == [1, 4]


def test_truncation_keeps_the_steps_that_end_within_max_length(byte_tokenizer):
    # prompt 5 ids; max_length 9 leaves room 4: step 1 (3 ids) fits, step 2 ends at 6 -> cut
    (example,) = validate(ROW)
    report = LoadReport()
    (tokens,) = encode_stepwise([example], byte_tokenizer, separator="\n", max_length=9, report=report)
    assert byte_tokenizer.decode(tokens.completion_ids) == "ab\n" and tokens.labels == [True]
    assert report.truncated == 1
    # room for no whole step: dropped; truncation "drop" drops any cut row
    assert encode_stepwise([example], byte_tokenizer, separator="\n", max_length=7, report=report) == []
    assert encode_stepwise([example], byte_tokenizer, separator="\n", max_length=9, truncation="drop",
                           report=report) == []  # fmt: skip
    assert report.dropped == 2


def test_last_step_only_keeps_the_last_label(byte_tokenizer):
    (example,) = validate(ROW)
    (tokens,) = encode_stepwise([example], byte_tokenizer, separator="\n", last_step_only=True)
    assert tokens.step_ends == [6] and tokens.labels == [False]


def test_collation_marks_labelled_positions_in_row_major_order(byte_tokenizer):
    examples = validate_rows([Row(ROW, "r1"), Row({"prompt": "1=", "completions": ["z"], "labels": [True]}, "r2")],
                             "stepwise")  # fmt: skip
    items = encode_stepwise(examples, byte_tokenizer, separator="\n")
    batch = collate_stepwise(items, pad_id=0)
    assert batch.input_ids_B_T.shape == (2, 12)
    assert batch.step_at_B_T.nonzero().tolist() == [[0, 7], [0, 11], [1, 4]]
    assert batch.labels_S.tolist() == [True, False, True]
    assert batch.attention_mask_B_T.sum(dim=1).tolist() == [12, 5]


def test_split_steps_cuts_a_sampled_completion_at_its_separators():
    assert split_steps("<think>7+8=15;3+5+1=9</think>95", ";") == ["<think>7+8=15", "3+5+1=9</think>95"]
    assert split_steps("a;;b;", ";") == ["a", "b"]
    assert split_steps("only", "") == ["only"]


def test_max_prompt_length_keeps_the_prompts_last_tokens(byte_tokenizer):
    # "2+2=" -> <|bos|> 2 + 2 = ; its last 3 ids are "+2=", counted as truncated once
    (example,) = validate(ROW)
    report = LoadReport()
    (tokens,) = encode_stepwise([example], byte_tokenizer, separator="\n", max_prompt_length=3, report=report)
    assert byte_tokenizer.decode(tokens.prompt_ids) == "+2=" and tokens.labels == [True, False]
    assert report.truncated == 1
