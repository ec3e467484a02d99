import math
import pickle

import pytest

from posttrain.data import (
    CompactExamples,
    ListwiseExample,
    PreferenceExample,
    PromptExample,
    Row,
    SFTExample,
    UnpairedExample,
    validate_rows,
)

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]
CALL = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "add", "arguments": {"a": 1}}}]}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def rows(*fields: dict, source: str = "data/d.jsonl line ") -> list[Row]:
    return [Row(f, f"{source}{i + 1}") for i, f in enumerate(fields)]


# every kind and form: (kind, rows, the dataclasses validate_rows builds for them, written out by hand)
CASES = {
    "sft": ("sft", rows(
        {"prompt": "2+2=", "completion": "4"},
        {"messages": [{"role": "system", "content": "be brief"}, user("hi"), assistant("yo")]},
        {"text": "plain text é 😀"},
        {"prompt": [user("add 1")], "completion": [CALL, {"role": "tool", "content": "1"}, assistant("1")],
         "tools": TOOLS},
        {"messages": [user("q"), assistant("a")], "tools": '[{"type": "function"}]'},
    ), [
        SFTExample("2+2=", "4", "data/d.jsonl line 1"),
        SFTExample(None, [{"role": "system", "content": "be brief"}, user("hi"), assistant("yo")],
                   "data/d.jsonl line 2"),
        SFTExample(None, "plain text é 😀", "data/d.jsonl line 3"),
        SFTExample([user("add 1")], [CALL, {"role": "tool", "content": "1"}, assistant("1")], "data/d.jsonl line 4",
                   TOOLS),
        SFTExample(None, [user("q"), assistant("a")], "data/d.jsonl line 5", [{"type": "function"}]),
    ]),
    "preference": ("preference", rows(
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"chosen": [user("sky?"), assistant("blue")], "rejected": [user("sky?"), assistant("green")]},
    ), [
        PreferenceExample("q", "a", "b", "data/d.jsonl line 1"),
        PreferenceExample("The sky is", " blue.", " green.", "data/d.jsonl line 2"),
        PreferenceExample([user("sky?")], [assistant("blue")], [assistant("green")], "data/d.jsonl line 3"),
    ]),
    "unpaired": ("unpaired", rows(
        {"prompt": "q", "completion": "a", "label": False},
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"prompt": [user("q")], "completion": [assistant("a")], "label": True},
    ), [
        UnpairedExample("q", "a", False, "data/d.jsonl line 1"),
        UnpairedExample("q", "good", True, "data/d.jsonl line 2 (chosen)"),
        UnpairedExample("q", "bad", False, "data/d.jsonl line 2 (rejected)"),
        UnpairedExample([user("q")], [assistant("a")], True, "data/d.jsonl line 3"),
    ]),
    "listwise": ("listwise", rows(
        {"prompt": "q", "completions": ["a", "b", "c"], "scores": [1, 0.5, -2]},
        {"prompt": [user("q")], "completions": [[assistant("a")], [assistant("b")]], "scores": [0.1, 1e300]},
    ), [
        ListwiseExample("q", ["a", "b", "c"], [1.0, 0.5, -2.0], "data/d.jsonl line 1"),
        ListwiseExample([user("q")], [[assistant("a")], [assistant("b")]], [0.1, 1e300], "data/d.jsonl line 2"),
    ]),
    "prompt": ("prompt", rows(
        {"prompt": "2+2=", "answer": "4", "level": 3, "tags": ["math", None], "meta": {"ok": True, "w": 0.5}},
        {"prompt": [user("hi")]},
    ), [
        PromptExample("2+2=", "data/d.jsonl line 1",
                      {"answer": "4", "level": 3, "tags": ["math", None], "meta": {"ok": True, "w": 0.5}}),
        PromptExample([user("hi")], "data/d.jsonl line 2", {}),
    ]),
}


@pytest.mark.parametrize("case", CASES)
def test_compact_examples_give_the_dataclasses_validated(case: str):
    kind, given, expected = CASES[case]
    examples = validate_rows(given, kind)
    assert isinstance(examples, CompactExamples)
    assert len(examples) == len(expected)
    assert list(examples) == expected
    assert [examples[i] for i in range(len(expected))] == expected
    assert [type(e) for e in examples] == [type(e) for e in expected]
    assert examples[-1] == expected[-1]
    assert examples == expected and expected == examples
    assert list(examples[1:]) == expected[1:] and list(examples[::-1]) == expected[::-1]
    assert isinstance(examples[:1], CompactExamples)
    unpickled = pickle.loads(pickle.dumps(examples))
    assert isinstance(unpickled, CompactExamples) and list(unpickled) == expected
    with pytest.raises(IndexError):
        examples[len(expected)]


def test_each_example_is_rebuilt_so_that_a_caller_changing_one_changes_no_other():
    (examples := CompactExamples()).append(SFTExample(None, [user("q"), assistant("a")], "d line 1"))
    examples[0].completion.append(user("again"))
    assert examples[0].completion == [user("q"), assistant("a")]


def test_where_of_any_form_is_given_back_as_written():
    wheres = ["a.jsonl line 1", "a.jsonl line 2 (chosen)", "b.json item 3", "a.jsonl line 0", "row 007",
              "no number", "", "x 12345678901234567890123", "a.jsonl line 3", "٣ arabic digit", "run2/a line 9",
              "a.jsonl line 4 (assistant turn 2)", "a.jsonl line 5 (assistant turn 2)", "train rows row 1 (chosen)",
              "a.jsonl line 12a", "a.jsonl line 05", *[f"file{i}.jsonl line {i}" for i in range(20)]]  # 20 sources
    examples = CompactExamples()
    for where in wheres:
        examples.append(SFTExample(None, "t", where))
    assert [e.where for e in examples] == wheres
    assert [e.where for e in pickle.loads(pickle.dumps(examples))] == wheres


class Label(str):
    pass


def test_an_example_marshal_cannot_keep_exactly_is_kept_as_it_is():
    # marshal writes a bytearray back as bytes, a str subclass not at all; a NaN score is equal to no NaN
    odd = [PromptExample("q", "p row 1", {"blob": bytearray(b"ab")}), PromptExample("q", "p row 2", {"l": Label("x")}),
           PromptExample("q", "p row 3", {"n": float("nan"), "b": b"raw"})]
    examples = CompactExamples()
    for example in odd:
        examples.append(example)
    assert examples[0] is odd[0] and examples[1] is odd[1]
    assert type(examples[0].extra["blob"]) is bytearray and type(examples[1].extra["l"]) is Label
    assert examples[2] is not odd[2] and examples[2].extra["b"] == b"raw" and math.isnan(examples[2].extra["n"])
    assert [e.where for e in pickle.loads(pickle.dumps(examples))] == ["p row 1", "p row 2", "p row 3"]


def test_compact_examples_are_read_only():
    examples = validate_rows(rows({"text": "a"}), "sft")
    with pytest.raises(TypeError):
        examples[0] = SFTExample(None, "b", "x")  # type: ignore[index]
    with pytest.raises(TypeError):
        hash(examples)
