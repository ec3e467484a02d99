"""Read rows from JSONL, JSON, Parquet, CSV files or a saved `datasets` directory.

Every row carries where it came from (`Row.where`, e.g. `"train.jsonl line 7"`) so that a later
validation error can name the file and the row. Numbers are 1-based: the line for JSONL (blank lines
are skipped but still counted), the item of the top-level list for JSON, the data row for CSV (the
header is not counted) and the row for Parquet and `datasets`.

JSON: a top-level list of objects, or an object `{"data": [...]}` (the layout of several published
datasets). CSV cells are text; a cell of a structured field (`messages`, `prompt`, `completion`,
`chosen`, `rejected`, `completions`, `scores`, `label`) that holds JSON for a list, or `true`/`false` (any
case), is decoded, so that conversational and unpaired data can live in CSV. Other columns stay text.
"""

import ast
import codecs
import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.data.errors import DataError
from posttrain.data.report import LoadReport

CSV_STRUCTURED_FIELDS = ("messages", "prompt", "completion", "chosen", "rejected", "completions", "scores",
                         "label")


@dataclass(frozen=True)
class Row:
    """One input row: its fields as read, and where it came from (`"data.jsonl line 3"`)."""

    fields: dict[str, Any]
    where: str


def read_rows(path: str | Path, *, split: str | None = None, on_bad_row: str = "error",
              report: LoadReport | None = None) -> list[Row]:
    """Read every row of a dataset file or a saved `datasets` directory.

    split: the split of a saved `DatasetDict` (needed when it holds more than one). Ignored for files.
    on_bad_row: "error" raises on a row that cannot be read (a JSONL line of invalid JSON or non-UTF-8
        bytes, an item that is not an object); "skip" leaves it out and counts it in `report.skipped`.
    report: counts rows read and skipped; its `rows` includes unreadable rows.
    Raises DataError for a missing or unreadable file, an unknown extension, a file that cannot be parsed
    as a whole, or a dataset with no rows; the message names the file and, where there is one, the row.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    try:
        results = _read_saved_dataset(path, split) if path.is_dir() else _reader_for(path)(path)
    except OSError as error:  # permissions, a device error, ...: the file, not a row, is at fault
        raise DataError(f"{path}: cannot read it ({error.strerror or error})") from None
    report = report if report is not None else LoadReport()
    report.source = report.source or str(path)
    rows = [result for result in results if not _is_skipped_bad_row(result, on_bad_row, report)]
    if not results:
        raise DataError(f"{path}: the dataset is empty (no rows)", reason="empty dataset")
    return rows


def _is_skipped_bad_row(result: "Row | DataError", on_bad_row: str, report: LoadReport) -> bool:
    report.rows += 1
    if not isinstance(result, DataError):
        return False
    if on_bad_row != "skip":
        raise result
    report.skipped[result.reason] += 1
    return True


def _reader_for(path: Path) -> Callable[[Path], list["Row | DataError"]]:
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}
    suffix = path.suffix.lower()
    if suffix not in readers:
        known = ", ".join(readers)
        raise DataError(f"{path}: unknown file extension {suffix!r}; supported: {known}, "
                        "or a directory written by datasets' save_to_disk")
    return readers[suffix]


def _read_jsonl(path: Path) -> list["Row | DataError"]:
    rows: list[Row | DataError] = []
    raw = path.read_bytes()
    raw = raw[len(codecs.BOM_UTF8) :] if raw.startswith(codecs.BOM_UTF8) else raw  # editors on Windows write one
    for number, raw_line in enumerate(raw.splitlines(), start=1):
        if raw_line.strip():
            rows.append(_parse_jsonl_line(raw_line, f"{path} line {number}"))
    return rows


def _parse_jsonl_line(raw_line: bytes, where: str) -> "Row | DataError":
    try:
        value = json.loads(_decode_utf8(raw_line, where))
    except json.JSONDecodeError as error:
        return DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno})",
                         reason="invalid json")
    except DataError as error:
        return error
    return _as_row(value, where)


def _read_json(path: Path) -> list["Row | DataError"]:
    text = _decode_utf8_file(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path} line {error.lineno}: invalid JSON ({error.msg} at column {error.colno})",
                        reason="invalid json") from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        found = f"an object with keys {sorted(value)}" if isinstance(value, dict) else type(value).__name__
        raise DataError(f"{path}: expected a list of objects or {{\"data\": [...]}}, found {found}")
    return [_as_row(item, f"{path} item {n}") for n, item in enumerate(value, start=1)]


def _read_csv(path: Path) -> list["Row | DataError"]:
    reader = csv.DictReader(io.StringIO(_decode_utf8_file(path), newline=""))
    rows: list[Row | DataError] = []
    for number, record in enumerate(reader, start=1):
        where = f"{path} row {number}"
        if None in record:
            columns = len(reader.fieldnames or [])
            message = f"{where}: more cells than the {columns} header columns"
            rows.append(DataError(message, reason="unreadable"))
            continue
        rows.append(Row({name: _decode_csv_cell(name, cell) for name, cell in record.items() if cell}, where))
    return rows


def _decode_csv_cell(name: str, cell: str) -> Any:
    if name not in CSV_STRUCTURED_FIELDS:
        return cell
    stripped = cell.strip()
    if stripped.lower() in ("true", "false"):  # pandas writes True/False
        return stripped.lower() == "true"
    if stripped.startswith("["):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            value = _python_literal(stripped)  # pandas' to_csv writes a list cell as its Python repr
        if _is_structured(name, value):
            return value
    return cell


def _python_literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None


def _is_structured(name: str, value: Any) -> bool:
    """Whether a decoded CSV cell is the field's structured form: a list of messages (dicts) or, for `scores`, of
    numbers; text that merely looks like a list ("[3, 1, 2]", a sorting task's prompt) stays text."""
    if not isinstance(value, list) or not value:
        return False
    if name == "scores":
        return all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    if name == "completions":  # listwise: texts, or conversations (lists of messages)
        return all(isinstance(v, str | list) for v in value)
    return all(isinstance(v, dict) for v in value)


def _read_parquet(path: Path) -> list["Row | DataError"]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({error})") from None
    return [Row(_present(record), f"{path} row {n}") for n, record in enumerate(table.to_pylist(), start=1)]


def _read_saved_dataset(path: Path, split: str | None) -> list["Row | DataError"]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise DataError(f"{path}: not a directory written by datasets' save_to_disk ({error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        loaded, split = _pick_split(loaded, split, path)
    label = f"{path} [{split}]" if split else str(path)
    return [Row(_present(record), f"{label} row {n}") for n, record in enumerate(loaded, start=1)]


ROW_FORM_FIELDS = frozenset({"prompt", "completion", "messages", "text", "chosen", "rejected", "label", "completions",
                             "scores"})  # fmt: skip
"""The fields whose presence decides a row's form (prompt + completion, messages, text, ...)."""


def _present(record: dict[str, Any]) -> dict[str, Any]:
    """A Parquet or Arrow record without the nulls of its form's fields: a table holds every column in every row,
    so a row without one (an optional prompt, `messages` beside `prompt`/`completion` rows) reads null there. Other
    columns keep their nulls: an `answer` of null is "not applicable" to the verifiers, as in JSONL."""
    return {name: value for name, value in record.items() if value is not None or name not in ROW_FORM_FIELDS}


def _pick_split(dataset_dict: Any, split: str | None, path: Path) -> tuple[Any, str]:
    splits = sorted(dataset_dict)
    if split is None and len(splits) == 1:
        split = splits[0]
    if split is None:
        raise DataError(f"{path}: holds splits {splits}; give the split's own directory, e.g. {path / splits[0]}")
    if split not in dataset_dict:
        raise DataError(f"{path}: no split {split!r}; splits: {splits}")
    return dataset_dict[split], split


def _as_row(value: Any, where: str) -> "Row | DataError":
    if not isinstance(value, dict):
        return DataError(f"{where}: expected a JSON object with named fields, found {type(value).__name__}",
                         reason="wrong type")
    return Row(value, where)


def _decode_utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{where}: bytes are not UTF-8 (byte {error.start + 1} of the line: "
                        f"{raw[error.start:error.start + 1]!r})", reason="not utf-8") from None


def _decode_utf8_file(path: Path) -> str:
    """The file's text; a UTF-8 byte-order mark at its start (Excel's "CSV UTF-8", Windows editors) is dropped."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: bytes are not UTF-8 ({raw[error.start:error.start + 1]!r})",
                        reason="not utf-8") from None
