import csv
import json
import re
import tracemalloc
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from posttrain.data import DataError, LoadReport, load_examples, read_rows

ROWS = [{"prompt": "two plus two", "completion": " four"}, {"prompt": "sky", "completion": " blue"}]
MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_skips_blank_lines_and_numbers_rows_by_line(tmp_path: Path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(ROWS[0]), "", json.dumps(ROWS[1])])
    rows = read_rows(path)
    assert [r.fields for r in rows] == ROWS
    assert [r.where for r in rows] == [f"{path} line 1", f"{path} line 3"]


def test_json_list_and_data_object(tmp_path: Path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "b.json").write_text(json.dumps({"data": ROWS}))
    for name in ("a.json", "b.json"):
        rows = read_rows(tmp_path / name)
        assert [r.fields for r in rows] == ROWS
        assert rows[1].where == f"{tmp_path / name} item 2"


def test_parquet_keeps_nested_messages(tmp_path: Path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": MESSAGES, "answer": "4"}]), path)
    rows = read_rows(path)
    assert rows[0].fields == {"messages": MESSAGES, "answer": "4"}
    assert rows[0].where == f"{path} row 1"


def test_csv_decodes_structured_fields_and_keeps_other_columns_as_text(tmp_path: Path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "completion", "label", "answer", "messages"])
        writer.writerow(["[INST] sky", " blue", "true", "42", json.dumps(MESSAGES)])
        writer.writerow(["q", " a", "False", "", ""])
    rows = read_rows(path)
    assert rows[1].fields == {"prompt": "q", "completion": " a", "label": False}  # empty cells are absent
    # "[INST] sky" is not JSON, so it stays text; "42" is not a structured field, so it stays text
    assert rows[0].fields == {"prompt": "[INST] sky", "completion": " blue", "label": True, "answer": "42",
                              "messages": MESSAGES}
    assert rows[0].where == f"{path} row 1"


def test_saved_dataset_and_dataset_dict_splits(tmp_path: Path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    assert [r.fields for r in read_rows(tmp_path / "one")] == ROWS
    both = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                                 "test": datasets.Dataset.from_list(ROWS[:1])})
    both.save_to_disk(str(tmp_path / "two"))
    test_rows = read_rows(tmp_path / "two", split="test")
    assert [r.fields for r in test_rows] == ROWS[:1]
    assert test_rows[0].where == f"{tmp_path / 'two'} [test] row 1"
    with pytest.raises(DataError, match=r"holds splits \['test', 'train'\]; give the split's own directory"):
        read_rows(tmp_path / "two")
    with pytest.raises(DataError, match="no split 'validation'"):
        read_rows(tmp_path / "two", split="validation")


def test_directory_that_is_not_a_saved_dataset(tmp_path: Path):
    with pytest.raises(DataError, match="not a directory written by datasets' save_to_disk"):
        read_rows(tmp_path)


def test_missing_file_and_unknown_extension(tmp_path: Path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("x")
    supported = "supported: .jsonl, .json, .parquet, .csv"
    with pytest.raises(DataError, match=re.escape(f"d.txt: unknown file extension '.txt'; {supported}")):
        read_rows(tmp_path / "d.txt")


def test_invalid_json_line_is_named_or_skipped_and_counted(tmp_path: Path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(ROWS[0]), '{"prompt": "x", ', json.dumps(ROWS[1])])
    with pytest.raises(DataError, match=re.escape(f"{path} line 2: invalid JSON")):
        read_rows(path)
    report = LoadReport()
    rows = read_rows(path, on_bad_row="skip", report=report)
    assert [r.fields for r in rows] == ROWS
    assert report.rows == 3 and report.skipped == {"invalid json": 1}


def test_non_utf8_bytes_name_the_line(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b'\n{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(DataError, match=re.escape(f"{path} line 2: bytes are not UTF-8")):
        read_rows(path)
    json_path = tmp_path / "d.json"
    json_path.write_bytes(b'[\n{"prompt": "a"},\n{"prompt": "caf\xe9"}\n]')
    with pytest.raises(DataError, match=re.escape(f"{json_path} line 3: bytes are not UTF-8")):
        read_rows(json_path)


def test_row_that_is_not_an_object(tmp_path: Path):
    path = write_jsonl(tmp_path / "d.jsonl", ['["a", "b"]'])
    message = f"{path} line 1: expected a JSON object with named fields, found list"
    with pytest.raises(DataError, match=re.escape(message)):
        read_rows(path)


def test_json_with_wrong_top_level(tmp_path: Path):
    (tmp_path / "d.json").write_text(json.dumps({"rows": ROWS}))
    message = "expected a list of objects or {\"data\": [...]}, found an object with keys ['rows']"
    with pytest.raises(DataError, match=re.escape(message)):
        read_rows(tmp_path / "d.json")


@pytest.mark.parametrize("name,content", [("e.jsonl", "\n\n"), ("e.json", "[]"),
                                          ("e.csv", "prompt,completion\n")])
def test_empty_dataset(tmp_path: Path, name: str, content: str):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=re.escape(f"{name}: the dataset is empty")):
        read_rows(tmp_path / name)


def test_a_byte_order_mark_is_not_part_of_the_first_field(tmp_path: Path):
    # Excel's "CSV UTF-8" and Windows editors start the file with U+FEFF: it was read into the first field's name
    bom = b"\xef\xbb\xbf"
    (tmp_path / "d.csv").write_bytes(bom + b"prompt,completion\nsky, blue\n")
    (tmp_path / "d.jsonl").write_bytes(bom + json.dumps(ROWS[0]).encode() + b"\n")
    (tmp_path / "d.json").write_bytes(bom + json.dumps(ROWS).encode())
    assert read_rows(tmp_path / "d.csv")[0].fields == {"prompt": "sky", "completion": " blue"}
    assert read_rows(tmp_path / "d.jsonl")[0].fields == ROWS[0]
    assert [r.fields for r in read_rows(tmp_path / "d.json")] == ROWS


def test_csv_list_cells_are_messages_only_when_they_hold_messages(tmp_path: Path):
    # pandas' to_csv writes a list of messages as its Python repr; a sorting task's "[3, 1, 2]" is text
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "completion", "scores"])
        writer.writerow([repr(MESSAGES[:1]), "[1, 2, 3]", "[0.5, 1]"])
        writer.writerow(["[3, 1, 2]", json.dumps(MESSAGES[1:]), "[true]"])
    first, second = (r.fields for r in read_rows(path))
    assert first == {"prompt": MESSAGES[:1], "completion": "[1, 2, 3]", "scores": [0.5, 1]}
    assert second == {"prompt": "[3, 1, 2]", "completion": MESSAGES[1:], "scores": "[true]"}


def test_arrow_nulls_are_absent_fields(tmp_path: Path):
    # a table holds every column in every row: a row without the optional prompt reads null there
    # (an answer of null stays: "not applicable" to the verifiers, as in JSONL)
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b", "answer": "1"},
            {"prompt": None, "chosen": "qa", "rejected": "qb", "answer": None}]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for source in (tmp_path / "d.parquet", tmp_path / "saved"):
        expected = [rows[0], {"chosen": "qa", "rejected": "qb", "answer": None}]
        assert [r.fields for r in read_rows(source)] == expected


# --- inputs that would exhaust memory or the stack (issue #21, item 7) ------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000  # json.loads raised RecursionError on it, under on_bad_row: skip too


def test_a_deeply_nested_jsonl_row_is_named_or_skipped(tmp_path: Path):
    lines = [json.dumps(ROWS[0]), '{"prompt": "a", "junk": ' + DEEP + "}", json.dumps(ROWS[1]),
             json.dumps({"prompt": "b", "junk": json.loads("[" * 65 + "]" * 65)})]  # parsed, but past 64
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError, match=re.escape(f"{path} line 2: lists and objects nested more than 64 deep")):
        read_rows(path)
    report = LoadReport()
    assert [r.fields for r in read_rows(path, on_bad_row="skip", report=report)] == ROWS
    assert report.rows == 4 and report.skipped == {"too deep": 2}


def test_a_deeply_nested_row_in_a_json_or_csv_file_is_named(tmp_path: Path):
    (tmp_path / "d.json").write_text("[" + json.dumps(ROWS[0]) + ', {"junk": ' + DEEP + "}]")
    message = f"{tmp_path / 'd.json'} item 2: lists and objects nested more than 64 deep (the file cannot be read"
    with pytest.raises(DataError, match=re.escape(message)):
        read_rows(tmp_path / "d.json", on_bad_row="skip")
    (tmp_path / "d.csv").write_text(f'prompt,completion\nq,a\n"{DEEP}",a\n')
    with pytest.raises(DataError, match=re.escape("row 2: field 'prompt': lists and objects nested more than 64")):
        read_rows(tmp_path / "d.csv")
    report = LoadReport()
    assert len(read_rows(tmp_path / "d.csv", on_bad_row="skip", report=report)) == 1
    assert report.skipped == {"too deep": 1}


def test_a_row_over_the_size_limit_is_named_or_skipped(tmp_path: Path):
    big = json.dumps({"prompt": "x" * 200, "completion": "y"})
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(ROWS[0]), big, json.dumps(ROWS[1])])
    with pytest.raises(DataError, match=re.escape(f"{path} line 2: the line holds more than 100 bytes")):
        read_rows(path, max_row_bytes=100)
    report = LoadReport()
    assert [r.fields for r in read_rows(path, on_bad_row="skip", report=report, max_row_bytes=100)] == ROWS
    assert report.skipped == {"row too large": 1}
    (tmp_path / "d.json").write_text(json.dumps([ROWS[0], json.loads(big)]))
    with pytest.raises(DataError, match=re.escape("d.json item 2: the item holds more than 100 bytes")):
        read_rows(tmp_path / "d.json", max_row_bytes=100)
    (tmp_path / "d.csv").write_text(f"prompt,completion\nq,a\n{'x' * 200},a\n")
    with pytest.raises(DataError, match=re.escape("d.csv row 2: the record holds more than 100 bytes")):
        read_rows(tmp_path / "d.csv", max_row_bytes=100)


def test_an_over_long_line_is_not_read_into_memory(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    with path.open("wb") as handle:  # a 40 MiB line between two good ones; the limit is 16 MiB
        handle.write(json.dumps(ROWS[0]).encode() + b'\n{"prompt": "')
        handle.write(b"x" * 40 * 2**20)
        handle.write(b'"}\n' + json.dumps(ROWS[1]).encode() + b"\n")
    report = LoadReport()
    tracemalloc.start()
    rows = read_rows(path, on_bad_row="skip", report=report)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [r.fields for r in rows] == ROWS and report.skipped == {"row too large": 1}
    assert peak < 20 * 2**20  # the 16 MiB kept before the limit, and a block; the whole file was 40 MiB


def test_a_csv_cell_over_128_kib_is_read(tmp_path: Path):
    # the csv module's default field limit (128 KiB) raised _csv.Error, a crash
    (tmp_path / "d.csv").write_text(f"prompt,completion\n{'x' * 200_000},a\n")
    assert read_rows(tmp_path / "d.csv")[0].fields == {"prompt": "x" * 200_000, "completion": "a"}


def test_a_python_literal_cell_with_too_many_elements_stays_text(tmp_path: Path):
    # ast.literal_eval spent about 1 KB and 5 us per element: a 4 MB cell took 1.8 GB
    cell = "[" + ",".join(["1"] * 100_001) + ",'x']"  # not JSON (the quote), so it was handed to literal_eval
    (tmp_path / "d.csv").write_text(f'prompt,completion\n"{cell}",a\n')
    assert read_rows(tmp_path / "d.csv")[0].fields["prompt"] == cell


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_rows_stream_so_loading_holds_little_more_than_the_examples(tmp_path: Path, fmt: str):
    rows = [{"prompt": f"{i}+{i % 7}=", "completion": str(i + i % 7)} for i in range(50_000)]
    path = tmp_path / f"d.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        path.write_text("prompt,completion\n" + "".join(f"{r['prompt']},{r['completion']}\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    tracemalloc.start()
    examples, _ = load_examples(path, "sft")
    kept, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert [(e.prompt, e.completion) for e in examples[:2]] == [("0+0=", "0"), ("1+1=", "2")]
    held_text = path.stat().st_size if fmt == "json" else 0  # a JSON list is parsed an item at a time from its text
    # reading every row first (lines, dicts, rows, then examples) peaked at 2.5 to 3.5 times what was kept, and
    # its rows alone take about 440 bytes each (22 MB here); one JSONL block read at a time is about 4 MiB: the
    # 1 MiB block, its joined copy and its ~28,000 lines as bytes
    block = 5 * 2**20 if fmt == "jsonl" else 2**21
    assert peak < 1.3 * kept + held_text + block


def test_examples_kept_take_about_the_size_of_the_file(tmp_path: Path):
    rows = [{"prompt": f"{i % 100}+{i % 7}=", "completion": str(i % 100 + i % 7)} for i in range(50_000)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # about 37 bytes a row
    tracemalloc.start()
    examples, _ = load_examples(path, "sft")
    kept = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(examples) == 50_000 and examples[49_999].completion == "104"  # 49,999 % 100 + 49,999 % 7 = 99 + 5
    # a list of SFTExample dataclasses kept about 7 times the file: 8 (the list) + 56 (the dataclass) + 2 x 54
    # (two short strings) + about 100 (where: "/tmp/.../d.jsonl line 123") bytes a row
    assert kept < 2 * path.stat().st_size
