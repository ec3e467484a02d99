"""Read rows from JSONL, JSON, Parquet, CSV files or a saved `datasets` directory, one row at a time.

Every row carries where it came from (`Row.where`, e.g. `"train.jsonl line 7"`) so that a later
validation error can name the file and the row. Numbers are 1-based: the line for JSONL (blank lines
are skipped but still counted), the item of the top-level list for JSON, the data row for CSV (the
header is not counted) and the row for Parquet and `datasets`.

JSON: a top-level list of objects, or an object `{"data": [...]}` (the layout of several published
datasets). CSV cells are text; a cell of a structured field (`messages`, `prompt`, `completion`,
`chosen`, `rejected`, `completions`, `scores`, `label`) that holds JSON for a list, or `true`/`false` (any
case), is decoded, so that conversational and unpaired data can live in CSV. Other columns stay text.

Rows are streamed (`iter_rows`): a JSONL or CSV file is read a line at a time, Parquet a batch of rows at a
time, a JSON list an item at a time from the file's text, so that what a caller keeps is all that stays in
memory. Bounds against hostile rows (docs/reliability.md): one row holds at most `MAX_ROW_BYTES` (a JSONL
line, a CSV record, a JSON item) and nests lists and objects at most `MAX_NESTING` deep; a row past either
is a bad row, named, or skipped and counted.
"""

import ast
import codecs
import csv
import gc
import io
import itertools
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.data.errors import DataError, show_names
from posttrain.data.report import LoadReport

CSV_STRUCTURED_FIELDS = ("messages", "prompt", "completion", "chosen", "rejected", "completions", "scores",
                         "label")
MAX_ROW_BYTES = 16 * 2**20
"""The most bytes one row may hold: a JSONL line, a CSV record, a JSON item (characters there)."""
MAX_NESTING = 64
"""The deepest nesting of lists and objects in a row (a conversation with tool calls needs about 6)."""
MAX_LITERAL_ELEMENTS = 100_000
"""The most elements a CSV cell in Python's repr form may hold: `ast.literal_eval` builds a node for each."""

Result = "Row | DataError"


@dataclass(frozen=True, slots=True)
class Row:
    """One input row: its fields as read, and where it came from (`"data.jsonl line 3"`)."""

    fields: dict[str, Any]
    where: str


def read_rows(path: str | Path, *, split: str | None = None, on_bad_row: str = "error",
              report: LoadReport | None = None, max_row_bytes: int = MAX_ROW_BYTES) -> list[Row]:
    """Every row of a dataset file or a saved `datasets` directory, as a list (`iter_rows` for the arguments)."""
    with gc_paused():
        return list(iter_rows(path, split=split, on_bad_row=on_bad_row, report=report, max_row_bytes=max_row_bytes))


def iter_rows(path: str | Path, *, split: str | None = None, on_bad_row: str = "error",
              report: LoadReport | None = None, max_row_bytes: int = MAX_ROW_BYTES) -> Iterator[Row]:
    """The rows of a dataset file or a saved `datasets` directory, read as they are asked for.

    split: the split of a saved `DatasetDict` (needed when it holds more than one). Ignored for files.
    on_bad_row: "error" raises on a row that cannot be read (a JSONL line of invalid JSON or non-UTF-8
        bytes, an item that is not an object, a row over `max_row_bytes` or nested over `MAX_NESTING`);
        "skip" leaves it out and counts it in `report.skipped`.
    report: counts rows read and skipped; its `rows` includes unreadable rows.
    Raises DataError for a missing or unreadable file, an unknown extension, a file that cannot be parsed
    as a whole, or a dataset with no rows; the message names the file and, where there is one, the row.
    A missing file or an unknown extension raises at once, the rest as the rows are read.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    read = _read_saved_dataset if path.is_dir() else _reader_for(path)
    report = report if report is not None else LoadReport()
    report.source = report.source or str(path)
    return _counted(read(path, split=split, max_row_bytes=max_row_bytes), path, on_bad_row, report)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while many rows are built: each of its passes walks every object
    alive, the rows kept so far included, and those passes took most of the time to load a large file
    (bench/RESULTS.md, "Loading rows"). Rows hold no reference cycles: reference counting frees what they leave."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _counted(results: Iterator[Result], path: Path, on_bad_row: str, report: LoadReport) -> Iterator[Row]:
    count = 0
    try:
        for result in results:
            count += 1
            report.rows += 1
            if not isinstance(result, DataError):
                yield result
            elif on_bad_row != "skip":
                raise result
            else:
                report.skipped[result.reason] += 1
    except OSError as error:  # permissions, a device error, ...: the file, not a row, is at fault
        raise DataError(f"{path}: cannot read it ({error.strerror or error})") from None
    if count == 0:
        raise DataError(f"{path}: the dataset is empty (no rows)", reason="empty dataset")


def _reader_for(path: Path) -> Callable[..., Iterator[Result]]:
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}
    suffix = path.suffix.lower()
    if suffix not in readers:
        known = ", ".join(readers)
        raise DataError(f"{path}: unknown file extension {suffix!r}; supported: {known}, "
                        "or a directory written by datasets' save_to_disk")
    return readers[suffix]


# --- JSONL --------------------------------------------------------------------------------------------

def _read_jsonl(path: Path, *, max_row_bytes: int, **_: Any) -> Iterator[Result]:
    with path.open("rb") as handle:
        for number, raw_line in _numbered_lines(handle, max_row_bytes):
            where = f"{path} line {number}"
            if raw_line is None:
                yield _too_large(where, "line", max_row_bytes)
            elif raw_line.strip():
                yield _parse_jsonl_line(raw_line, where)


def _numbered_lines(handle: Any, limit: int, block_bytes: int = 2**20) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) of a binary file's lines, split as `bytes.splitlines` splits the whole file, read a
    block at a time; None for a line longer than `limit` bytes, which is skipped unread past the limit (and is
    one line then, even where it holds a lone "\r")."""
    number, pieces, carried, skipping = 0, [], 0, False  # pieces: the start of a line, from earlier blocks
    first = handle.read(max(block_bytes, len(codecs.BOM_UTF8)))
    first = first[len(codecs.BOM_UTF8):] if first.startswith(codecs.BOM_UTF8) else first  # Windows editors write one
    for block in itertools.chain([first], iter(lambda: handle.read(block_bytes), b"")):
        if skipping:  # the rest of a line over the limit
            newline = block.find(b"\n")
            block, skipping = (block[newline + 1:], False) if newline >= 0 else (b"", True)
        end = block.rfind(b"\n") + 1  # lines end at "\n": a block's last "\r" may be the first half of "\r\n"
        if end:
            for line in b"".join([*pieces, block[:end]]).splitlines():
                number += 1
                yield number, line if len(line) <= limit else None
            pieces, carried = [block[end:]], len(block) - end
        else:
            pieces.append(block)
            carried += len(block)
        if carried > limit + 1:  # + 1: its "\r\n" may have been cut in two
            number += 1
            yield number, None
            pieces, carried, skipping = [], 0, True
    for line in b"".join(pieces).splitlines():
        number += 1
        yield number, line if len(line) <= limit else None


def _parse_jsonl_line(raw_line: bytes, where: str) -> Result:
    try:
        value = _json_value(_decode_utf8(raw_line, where))
    except json.JSONDecodeError as error:
        return DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno})",
                         reason="invalid json")
    except RecursionError:
        return _too_deep(where)
    except DataError as error:
        return error
    return _as_row(value, where, brackets=raw_line.count(b"[") + raw_line.count(b"{"))


WHITESPACE = re.compile(r"[ \t\n\r]*")
SCAN_JSON = json.JSONDecoder().scan_once


def _json_value(text: str) -> Any:
    """`json.loads(text)`, the same value and errors, from its C scanner without the Python that `loads` wraps
    around it, a large part of the time to load a JSONL file of short rows (bench/RESULTS.md, "Loading rows")."""
    start = WHITESPACE.match(text).end()
    try:
        value, end = SCAN_JSON(text, start)
    except StopIteration as stop:
        raise json.JSONDecodeError("Expecting value", text, stop.value) from None
    if end != len(text) and (end := WHITESPACE.match(text, end).end()) != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return value


# --- JSON ---------------------------------------------------------------------------------------------


def _read_json(path: Path, *, max_row_bytes: int, **_: Any) -> Iterator[Result]:
    text = _decode_utf8_file(path)
    start = WHITESPACE.match(text).end()
    if not text.startswith("[", start):
        yield from _read_json_document(path, text)
        return
    number = 0
    try:
        for number, (value, begin, end) in enumerate(_json_items(text, start), start=1):
            where = f"{path} item {number}"
            if end - begin > max_row_bytes:
                yield _too_large(where, "item", max_row_bytes)
            else:
                yield _as_row(value, where, brackets=text.count("[", begin, end) + text.count("{", begin, end))
    except json.JSONDecodeError as error:
        raise _invalid_json(path, error) from None
    except RecursionError:
        where = f"{path} item {number + 1}"
        raise DataError(f"{_too_deep(where)} (the file cannot be read past it)", reason="too deep") from None


def _json_items(text: str, start: int) -> Iterator[tuple[Any, int, int]]:
    """(value, begin, end) of each item of the JSON list whose `[` is at `start`, parsed one at a time, so that
    the file's text and one item are in memory and not every item at once; then nothing may follow the `]`."""
    decoder = json.JSONDecoder()
    position = WHITESPACE.match(text, start + 1).end()
    if not text.startswith("]", position):
        while True:
            value, end = decoder.raw_decode(text, position)
            yield value, position, end
            position = WHITESPACE.match(text, end).end()
            if text.startswith("]", position):
                break
            if not text.startswith(",", position):
                raise json.JSONDecodeError("Expecting ',' delimiter", text, position)
            position = WHITESPACE.match(text, position + 1).end()
    end = WHITESPACE.match(text, position + 1).end()
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)


def _read_json_document(path: Path, text: str) -> Iterator[Result]:
    """A JSON file that is not a list: `{"data": [...]}`, parsed whole."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise _invalid_json(path, error) from None
    except RecursionError:
        raise _too_deep(str(path)) from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        found = f"an object with keys {show_names(value)}" if isinstance(value, dict) else type(value).__name__
        raise DataError(f"{path}: expected a list of objects or {{\"data\": [...]}}, found {found}")
    for n, item in enumerate(value, start=1):
        yield _as_row(item, f"{path} item {n}", brackets=None)


def _invalid_json(path: Path, error: json.JSONDecodeError) -> DataError:
    return DataError(f"{path} line {error.lineno}: invalid JSON ({error.msg} at column {error.colno})",
                     reason="invalid json")


# --- CSV ----------------------------------------------------------------------------------------------

def _read_csv(path: Path, *, max_row_bytes: int, **_: Any) -> Iterator[Result]:
    with path.open("rb") as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as text:
        lines = _RecordLines(text, max_row_bytes)
        reader = csv.DictReader(lines)
        for number in itertools.count(1):
            where = f"{path} row {number}"
            lines.start_record()
            try:
                record = _next_record(reader, max_row_bytes)
            except UnicodeDecodeError:
                line, byte = _first_non_utf8(path)
                raise DataError(f"{path} line {line}: bytes are not UTF-8 ({byte!r})", reason="not utf-8") from None
            except _RecordTooLarge:
                raise DataError(f"{_too_large(where, 'record', max_row_bytes)} (the file cannot be read past it)",
                                reason="row too large") from None
            except csv.Error as error:
                raise DataError(f"{where}: not readable as CSV ({error})") from None
            if record is None:
                return
            yield _csv_row(record, where, len(reader.fieldnames or []))


class _RecordTooLarge(Exception):
    pass


class _RecordLines:
    """The lines of a text file for `csv.reader`, refusing one record (the lines read since `start_record`)
    longer than `limit` characters before it is read further."""

    def __init__(self, text: io.TextIOBase, limit: int):
        self.text, self.limit, self.record_chars = text, limit, 0

    def __iter__(self) -> "_RecordLines":
        return self

    def __next__(self) -> str:
        line = self.text.readline(self.limit + 1 - self.record_chars)
        if not line:
            raise StopIteration
        self.record_chars += len(line)
        if self.record_chars > self.limit:
            raise _RecordTooLarge
        return line

    def start_record(self) -> None:
        self.record_chars = 0


def _next_record(reader: csv.DictReader, limit: int) -> dict[str | None, Any] | None:
    """The next record, read with the csv module's field size limit (process-wide) raised to `limit` for
    this call only: its default, 128 KiB, refused long text cells."""
    previous = csv.field_size_limit(max(limit, csv.field_size_limit()))
    try:
        return next(reader, None)
    finally:
        csv.field_size_limit(previous)


def _csv_row(record: dict[str | None, Any], where: str, columns: int) -> Result:
    if None in record:
        return DataError(f"{where}: more cells than the {columns} header columns", reason="unreadable")
    try:
        return Row({name: _decode_csv_cell(name, cell) for name, cell in record.items() if cell}, where)
    except DataError as error:
        return DataError(f"{where}: {error}", reason=error.reason)


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
        except RecursionError:
            raise _too_deep(f"field {name!r}") from None
        if stripped.count("[") + stripped.count("{") > MAX_NESTING and _nested_deeper(value, MAX_NESTING):
            raise _too_deep(f"field {name!r}")
        if _is_structured(name, value):
            return value
    return cell


def _python_literal(text: str) -> Any:
    if text.count(",") + text.count(":") > MAX_LITERAL_ELEMENTS:
        return None
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


def _first_non_utf8(path: Path) -> tuple[int, bytes]:
    """The line and the byte where a file's first bytes that are not UTF-8 start, read a block at a time."""
    line, carry = 1, b""
    with path.open("rb") as handle:
        while block := handle.read(2**20):
            data = carry + block
            try:
                data.decode("utf-8")
                carry = b""
            except UnicodeDecodeError as error:
                if error.reason != "unexpected end of data":
                    return line + data[:error.start].count(b"\n"), data[error.start:error.start + 1]
                carry, data = data[error.start:], data[:error.start]  # a character cut by the block's end
            line += data.count(b"\n")
    return line, carry[:1]


# --- Arrow: Parquet and saved datasets ----------------------------------------------------------------

def _read_parquet(path: Path, **_: Any) -> Iterator[Result]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        _check_arrow_nesting(parquet.schema_arrow, path)
        batches = parquet.iter_batches(batch_size=1024)
        numbers = itertools.count(1)
        for batch in batches:
            for record in batch.to_pylist():
                yield Row(_present(record), f"{path} row {next(numbers)}")
    except DataError:
        raise
    except Exception as error:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({error})") from None


def _read_saved_dataset(path: Path, *, split: str | None, **_: Any) -> Iterator[Result]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise DataError(f"{path}: not a directory written by datasets' save_to_disk ({error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        loaded, split = _pick_split(loaded, split, path)
    _check_arrow_nesting(loaded.data.schema, path)
    label = f"{path} [{split}]" if split else str(path)
    for n, record in enumerate(loaded, start=1):
        yield Row(_present(record), f"{label} row {n}")


def _check_arrow_nesting(schema: Any, path: Path) -> None:
    """Arrow columns nest as their type says, the same in every row: one check for the whole file."""
    types = [(field.type, 1) for field in schema]
    while types:
        kind, depth = types.pop()
        if depth > MAX_NESTING:
            raise _too_deep(str(path))
        types += [(kind.field(i).type, depth + 1) for i in range(kind.num_fields)]


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


# --- rows ---------------------------------------------------------------------------------------------

def _as_row(value: Any, where: str, *, brackets: int | None) -> Result:
    """`value` as a row; `brackets` counts the `[` and `{` of its text (None: not known), which bounds its
    nesting, so that only a row that could nest too deep is walked."""
    if not isinstance(value, dict):
        return DataError(f"{where}: expected a JSON object with named fields, found {type(value).__name__}",
                         reason="wrong type")
    if (brackets is None or brackets > MAX_NESTING) and _nested_deeper(value, MAX_NESTING):
        return _too_deep(where)
    return Row(value, where)


def _nested_deeper(value: Any, limit: int) -> bool:
    """Whether lists and dicts nest in `value` more than `limit` deep (a walk without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            stack += [(child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)]
    return False


def _too_deep(where: str) -> DataError:
    return DataError(f"{where}: lists and objects nested more than {MAX_NESTING} deep", reason="too deep")


def _too_large(where: str, unit: str, limit: int) -> DataError:
    return DataError(f"{where}: the {unit} holds more than {_size(limit)}, the most one row may hold",
                     reason="row too large")


def _size(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n} bytes"


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
