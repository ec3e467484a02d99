import json
import re
from pathlib import Path

import pytest

from posttrain.data import (
    DataError,
    ListwiseExample,
    PreferenceExample,
    PromptExample,
    Row,
    SFTExample,
    UnpairedExample,
    load_examples,
    validate_rows,
)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def row(**fields) -> Row:
    return Row(fields, "d.jsonl line 4")


def validate_one(kind: str, **fields):
    return validate_rows([row(**fields)], kind)[0]


def test_sft_forms():
    assert validate_one("sft", prompt="2+2=", completion="4") == SFTExample("2+2=", "4", "d.jsonl line 4")
    chat = [{"role": "system", "content": "be brief"}, user("hi"), assistant("yo")]
    assert validate_one("sft", messages=chat) == SFTExample(None, chat, "d.jsonl line 4")
    assert validate_one("sft", text="plain text") == SFTExample(None, "plain text", "d.jsonl line 4")
    multi_turn_completion = [assistant("call"), {"role": "tool", "content": "42"}, assistant("it is 42")]
    example = validate_one("sft", prompt=[user("q")], completion=multi_turn_completion)
    assert example.completion == multi_turn_completion


def test_preference_forms_and_implicit_prompt():
    explicit = validate_one("preference", prompt="q", chosen="a", rejected="b")
    assert explicit == PreferenceExample("q", "a", "b", "d.jsonl line 4")
    assert validate_one("preference", chosen="a", rejected="b") == PreferenceExample(None, "a", "b",
                                                                                    "d.jsonl line 4")
    implicit = validate_one("preference", chosen=[user("sky?"), assistant("blue")],
                            rejected=[user("sky?"), assistant("green")])
    assert implicit == PreferenceExample([user("sky?")], [assistant("blue")], [assistant("green")],
                                         "d.jsonl line 4")


def test_unpaired_listwise_and_prompt_kinds():
    assert validate_one("unpaired", prompt="q", completion="a", label=False) == UnpairedExample(
        "q", "a", False, "d.jsonl line 4")
    listwise = validate_one("listwise", prompt="q", completions=["a", "b", "c"], scores=[1, 0.5, -2])
    assert listwise == ListwiseExample("q", ["a", "b", "c"], [1.0, 0.5, -2.0], "d.jsonl line 4")
    prompt = validate_one("prompt", prompt=[user("2+2?")], answer="4", level=3)
    assert prompt == PromptExample([user("2+2?")], "d.jsonl line 4", {"answer": "4", "level": 3})


BAD_ROWS = [
    # (kind, fields, reason, words the message must hold besides the place)
    ("sft", {"prompt": "q", "answer": "a"}, "missing field",
     "fields found: ['answer', 'prompt']; expected 'prompt' + 'completion', or 'messages', or 'text'"),
    ("preference", {"chosen": "a"}, "missing field", "expected 'chosen' + 'rejected'"),
    ("unpaired", {"prompt": "q", "completion": "a", "label": "yes"}, "bad label",
     "field 'label': expected true or false, found 'yes'"),
    ("unpaired", {"prompt": "q", "completion": "a", "label": 1}, "bad label", "field 'label'"),
    ("sft", {"prompt": "q", "completion": 7}, "mixed forms", "field 'completion'"),
    ("sft", {"prompt": 7, "completion": "a"}, "wrong type",
     "field 'prompt': expected text or a non-empty list"),
    ("sft", {"prompt": "q", "completion": "  "}, "empty text", "field 'completion': empty text"),
    ("sft", {"text": ""}, "empty text", "field 'text': empty text"),
    ("sft", {"prompt": "q", "completion": [assistant("a")]}, "mixed forms",
     "field 'completion': 'prompt' is text but 'completion' is list"),
    ("sft", {"messages": [user("hi"), {"role": "bot", "content": "yo"}]}, "unknown role",
     "field 'messages[1]': unknown role 'bot'; allowed: system, user, assistant, tool"),
    ("sft", {"messages": [user("hi"), {"role": "assistant"}]}, "wrong type", "field 'messages[1]'"),
    ("sft", {"messages": [user("hi"), assistant("yo"), user("and?")]}, "turn order",
     "it must end with assistant"),
    ("sft", {"messages": [user("hi"), assistant("yo"), assistant("again")]}, "turn order",
     "two assistant turns in a row"),
    ("sft", {"messages": [user("hi"), {"role": "system", "content": "s"}, assistant("yo")]}, "turn order",
     "a system message may only come first"),
    ("sft", {"messages": [assistant("yo")]}, "turn order", "the first turn must be user"),
    ("sft", {"messages": [user("hi"), {"role": "tool", "content": "1"}, assistant("yo")]}, "turn order",
     "a tool turn must follow an assistant or tool turn"),
    ("sft", {"messages": [user("hi"), assistant("")]}, "empty text", "field messages[1].content: empty text"),
    ("sft", {"messages": []}, "wrong type", "field 'messages'"),
    ("sft", {"prompt": [user("q"), assistant("a")], "completion": [assistant("b")]}, "turn order",
     "field 'prompt'"),
    ("preference", {"prompt": [user("q")], "chosen": [assistant("a"), user("b"), assistant("c")],
                    "rejected": [assistant("d")]}, "turn order",
     "field 'chosen': expected exactly one assistant message"),
    ("preference", {"chosen": [user("a"), assistant("x")], "rejected": [user("b"), assistant("y")]},
     "turn order", "share no leading messages"),
    ("listwise", {"prompt": "q", "completions": ["a"], "scores": [1]}, "wrong type",
     "field 'completions': expected a list of at least 2"),
    ("listwise", {"prompt": "q", "completions": ["a", "b"], "scores": [1]}, "bad scores",
     "field 'scores': expected a list of 2 numbers"),
    ("listwise", {"prompt": "q", "completions": ["a", "b"], "scores": [1, True]}, "bad scores",
     "field 'scores[1]': expected a finite number"),
    ("listwise", {"prompt": "q", "completions": ["a", ""], "scores": [1, 2]}, "empty text",
     "field 'completions[1]': empty text"),
    ("prompt", {"prompt": [user("q"), assistant("a")]}, "turn order", "it must end with user or tool"),
]


@pytest.mark.parametrize("kind,fields,reason,words", BAD_ROWS)
def test_bad_row_error_names_row_and_field(kind: str, fields: dict, reason: str, words: str):
    with pytest.raises(DataError) as caught:
        validate_rows([row(**fields)], kind)
    assert str(caught.value).startswith("d.jsonl line 4: ")
    assert words in str(caught.value)
    assert caught.value.reason == reason


def test_skip_counts_each_reason_and_keeps_good_rows(tmp_path: Path):
    lines = [
        {"prompt": "q", "completion": "a"},                    # good
        {"prompt": "q", "completion": ""},                     # empty text
        {"messages": [user("hi"), assistant("yo")]},           # good
        {"messages": [user("hi"), user("again")]},             # turn order
        {"prompt": "q"},                                       # missing field
        {"prompt": "q", "completion": " "},                    # empty text
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\nnot json\n")
    examples, report = load_examples(path, "sft", on_bad_row="skip")
    assert [e.where for e in examples] == [f"{path} line 1", f"{path} line 3"]
    assert report.rows == 7 and report.kept == 2
    assert report.skipped == {"empty text": 2, "turn order": 1, "missing field": 1, "invalid json": 1}
    assert report.summary() == (f"{path}: 7 rows, 5 skipped (empty text: 2, invalid json: 1, "
                                "missing field: 1, turn order: 1), 0 truncated, 0 dropped")


def test_error_mode_stops_at_the_first_bad_row_with_its_file_and_line(tmp_path: Path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": "ok", "label": 1}) + "\n"
                    + json.dumps({"txt": "x"}) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{path} line 3: fields found: ['txt']")):
        load_examples(path, "sft")


def test_unknown_kind_and_on_bad_row_value():
    with pytest.raises(ValueError, match="kind: 'dpo' is not a data kind; kinds: sft, preference"):
        validate_rows([row(text="x")], "dpo")
    with pytest.raises(ValueError, match="on_bad_row: 'warn'; allowed: 'error', 'skip'"):
        validate_rows([row(text="x")], "sft", on_bad_row="warn")


def test_a_lone_surrogate_is_named_with_its_field_or_skipped(tmp_path: Path):
    # JSON's "\ud800" escape decodes to a lone surrogate, which no tokenizer can encode (a TypeError there)
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "1+1=", "completion": "2"}\n'
                    '{"prompt": "caf\\u00e9 \\ud83d\\ude00", "completion": "2"}\n'  # a whole pair: one character
                    '{"prompt": "1+1=", "completion": "x\\ud800"}\n'
                    '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\udfff"}]}\n'
                    '{"prompt": "1+1=", "completion": "2", "note": {"\\ud800": 1}}\n')
    message = ("line 3: field 'completion': lone surrogate U+D800 at character 2, which is not Unicode text (half of "
               "a UTF-16 pair, e.g. a JSON \\ud800 escape without its other half); write the whole character or "
               "remove it")
    with pytest.raises(DataError, match=re.escape(f"{path} {message}")):
        load_examples(path, "sft")
    examples, report = load_examples(path, "sft", on_bad_row="skip")
    assert [e.where for e in examples] == [f"{path} line 1", f"{path} line 2"]
    assert examples[1].prompt == "café 😀"
    assert report.skipped == {"invalid unicode": 3}
    with pytest.raises(DataError, match=re.escape("line 4: field 'messages[1].content': lone surrogate U+DFFF")):
        validate_rows([Row(json.loads(path.read_text().splitlines()[3]), "line 4")], "sft")
    with pytest.raises(DataError, match=re.escape("line 5: the key '\\ud800' in field 'note': lone surrogate")):
        validate_rows([Row(json.loads(path.read_text().splitlines()[4]), "line 5")], "sft")


def test_error_messages_show_a_huge_value_in_a_few_dozen_characters():
    huge = ["x" * 10_000_000] * 1000  # its repr would be 10 GB
    with pytest.raises(DataError) as error:
        validate_rows([row(prompt=huge, completion="a")], "sft")
    assert len(str(error.value)) < 300
    with pytest.raises(DataError) as error:
        validate_rows([row(**{f"field{i}": "x" for i in range(100_000)})], "sft")
    assert len(str(error.value)) < 600 and "and 99980 more" in str(error.value)  # 20 of the 100,000 names shown
