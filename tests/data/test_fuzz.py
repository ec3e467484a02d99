"""Fuzzing the data readers (issue #21, item 8): random bytes, random JSON nesting and random CSV cells in
every file format are read and validated with no exception but the documented DataError (no RecursionError,
MemoryError, csv.Error, UnicodeError, TypeError), and within a bounded amount of memory. The streaming readers
are also held equal to the plain reading they replaced: `bytes.splitlines` of the whole file, `json.loads`."""

from __future__ import annotations

import contextlib
import io
import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posttrain.data import DataError, LoadReport, load_examples, read_rows
from posttrain.data.readers import _numbered_lines

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
KINDS = ("sft", "preference", "unpaired", "listwise", "prompt")
FIELDS = ["prompt", "completion", "messages", "text", "chosen", "rejected", "label", "completions", "scores", "answer"]

SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20),
                   st.sampled_from(["\ud800", "a\udfffb", "\ud83d\ude00", "user", "assistant", "role", "content"]))
JSON_VALUE = st.recursive(
    SCALAR,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from([*FIELDS, "role", "content"]), st.text(max_size=5)), inner,
                        max_size=4),
    ),
    max_leaves=20,
)
ROW = st.dictionaries(st.sampled_from(FIELDS), JSON_VALUE, max_size=4)
DEPTH = st.integers(min_value=1, max_value=3000)


def read_and_validate(path: Path, kind: str, on_bad_row: str) -> None:
    """Read and validate `path`; only a DataError may escape."""
    with contextlib.suppress(DataError):
        load_examples(path, kind, on_bad_row=on_bad_row)  # type: ignore[arg-type]


@pytest.fixture
def directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@SETTINGS
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".jsonl", ".json", ".csv"]), kind=st.sampled_from(KINDS),
       on_bad_row=st.sampled_from(["error", "skip"]))
def test_random_bytes_raise_only_data_errors(directory: Path, data: bytes, suffix: str, kind: str, on_bad_row: str):
    path = directory / f"d{suffix}"
    path.write_bytes(data)
    read_and_validate(path, kind, on_bad_row)


@SETTINGS
@given(rows=st.lists(ROW, min_size=1, max_size=5), depth=DEPTH, opener=st.sampled_from(["[", "{"]),
       at=st.integers(min_value=0, max_value=4), field=st.sampled_from(FIELDS), kind=st.sampled_from(KINDS),
       on_bad_row=st.sampled_from(["error", "skip"]), suffix=st.sampled_from([".jsonl", ".json"]))
def test_random_json_nesting_raises_only_data_errors(
    directory: Path, rows: list[dict[str, Any]], depth: int, opener: str, at: int, field: str, kind: str,
    on_bad_row: str, suffix: str,
):
    texts = [json.dumps(r) for r in rows]
    deep = "[" * depth + "]" * depth if opener == "[" else '{"a": ' * depth + "1" + "}" * depth
    i = at % len(rows)
    texts[i] = texts[i][:-1] + (", " if rows[i] else "") + f'"{field}": {deep}}}'  # the field nested `depth` deep
    path = directory / f"d{suffix}"
    path.write_text("\n".join(texts) + "\n" if suffix == ".jsonl" else "[" + ",\n".join(texts) + "]")
    report = LoadReport()
    try:
        kept = read_rows(path, on_bad_row=on_bad_row, report=report)
    except DataError:
        return
    assert len(kept) + sum(report.skipped.values()) == len(rows)  # every row is kept or counted
    read_and_validate(path, kind, on_bad_row)


CELL = st.one_of(
    st.text(max_size=30),
    st.builds(json.dumps, JSON_VALUE),
    st.builds(repr, JSON_VALUE),  # pandas' to_csv writes a list cell as its Python repr
    st.builds(lambda d: "[" * d + "]" * d, DEPTH),
    st.sampled_from(["true", "False", "[1, 2", "['a', {'role': 'user'}]", '"', '""', "\r", "\n", "\x00"]),
)


@SETTINGS
@given(header=st.lists(st.sampled_from(FIELDS), min_size=1, max_size=4, unique=True),
       cells=st.lists(st.lists(CELL, max_size=5), min_size=1, max_size=4), kind=st.sampled_from(KINDS),
       on_bad_row=st.sampled_from(["error", "skip"]))
def test_random_csv_cells_raise_only_data_errors(directory, header, cells, kind, on_bad_row):
    import csv

    path = directory / "d.csv"
    with path.open("w", newline="", encoding="utf-8", errors="surrogatepass") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(cells)
    read_and_validate(path, kind, on_bad_row)


@SETTINGS
@given(data=st.binary(max_size=2000), suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_reading_random_bytes_stays_within_a_bounded_amount_of_memory(directory: Path, data: bytes, suffix: str):
    path = directory / f"d{suffix}"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        read_and_validate(path, "prompt", "skip")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**21 + 200 * len(data)  # a block of the file, and the rows of 2 kB of it


# --- the streaming readers equal the plain reading they replaced --------------------------------------------

LINE_BYTES = st.lists(st.sampled_from([b"a", b"{}", b" ", b"\n", b"\r", b"\r\n", b"\xef\xbb\xbf", b"xyz"]),
                      max_size=40).map(b"".join)


@SETTINGS
@given(data=LINE_BYTES, block_bytes=st.integers(min_value=1, max_value=9), limit=st.integers(min_value=1, max_value=9))
def test_lines_read_a_block_at_a_time_are_the_lines_of_the_whole_file(data: bytes, block_bytes: int, limit: int):
    whole = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    expected = [(n, line if len(line) <= limit else None) for n, line in enumerate(whole.splitlines(), start=1)]
    got = list(_numbered_lines(io.BytesIO(data), limit, block_bytes=block_bytes))
    if not any(len(segment) > limit + 1 and b"\r" in segment for segment in whole.split(b"\n")):
        assert got == expected
    else:  # a stretch over the limit is skipped unread: one line then, also where a lone "\r" would split it
        assert all(line is None or len(line) <= limit for _, line in got)


@SETTINGS
@given(items=st.lists(st.dictionaries(st.text(max_size=5), JSON_VALUE, max_size=3), max_size=5),
       space=st.sampled_from(["", " ", "\n", " \r\n\t"]))
def test_a_json_list_read_an_item_at_a_time_equals_json_loads(directory: Path, items: list[dict], space: str):
    text = space + "[" + space + f"{space},{space}".join(json.dumps(i) for i in items) + space + "]" + space
    path = directory / "d.json"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        expected = json.loads(text)
    except RecursionError:
        return
    try:
        rows = read_rows(path, on_bad_row="skip")
    except DataError as error:
        assert expected == [] and "the dataset is empty" in str(error)
        return
    assert [r.fields for r in rows] == expected


@pytest.mark.parametrize("text", ["[1 2]", "[{}, ]", "[{}", "[{}] x", "[{}]]", "[{\"a\": 1,}]", "[\n{},\n{\"a\" 1}]"])
def test_a_malformed_json_list_names_the_line_json_loads_names(tmp_path: Path, text: str):
    (tmp_path / "d.json").write_text(text)
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    with pytest.raises(DataError) as error:
        read_rows(tmp_path / "d.json", on_bad_row="skip")
    e = expected.value
    assert str(error.value) == f"{tmp_path / 'd.json'} line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})"
