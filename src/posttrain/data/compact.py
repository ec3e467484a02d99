"""A read-only sequence of examples kept as bytes, so that a large dataset's examples take about the file's size.

An example is a frozen dataclass (`SFTExample`, ..., and `SFTTokens`, an example encoded) whose fields are Python
strings, lists and dicts: about 280 bytes for a 38-byte JSONL row of short text, 400 for its tokens (bench/RESULTS.md,
"Loading rows"). `CompactExamples` keeps each one as
the `marshal` bytes of its fields, all in one `bytearray` with an offset per example, and builds the dataclass
again when it is asked for (`examples[i]`, a slice, iteration): equal to the one appended, not the same object.

`where` ("data.jsonl line 7", "... line 7 (chosen)") is kept as its number when it is the collection's first source
("data.jsonl line ") followed by a number, else as (source, number, ending) indices into two short tables, or
whole. An example whose fields `marshal` does not write exactly (an object of another type in a prompt row's
other columns, passed from Python) is kept as it is.

Pickling keeps the bytes (a rank or a worker process receives the compact form); `marshal`'s format is
Python's own, so a pickle is read by the same Python version.
"""

from __future__ import annotations

import marshal
import re
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import fields
from operator import attrgetter
from typing import Any, overload

ROW_WHERE = re.compile(r"(.* (?:line|item|row) )(0|[1-9]\d{0,17})(\D.*|)", re.ASCII | re.DOTALL)
"""A `where` the readers write: source ("data.jsonl line "), the row's number, an ending (" (chosen)")."""
NUMBERED = re.compile(r"(.*\D|)(0|[1-9]\d{0,17})(\D*)", re.ASCII | re.DOTALL)
"""A `where` as source + number + ending: the number's last run of digits, written as `str(int)` writes it."""
AFTER_SOURCE = re.compile(r"(0|[1-9]\d{0,17})(\D.*|)", re.ASCII | re.DOTALL)
"""What follows a known source: the row's number (as `str(int)` writes it), then any ending (" (assistant turn 2)")."""
MAX_SOURCES, MAX_ENDINGS = 16, 4096
"""The most distinct sources and endings a collection keeps in its tables; a `where` past them is kept whole."""


EXACT = frozenset({str, int, float, bool, type(None), bytes})
"""Types that `marshal` writes and reads back as they were (it writes any other buffer, a bytearray or a numpy
array, as bytes)."""
CONTAINERS = frozenset({list, tuple, dict})


def _marshal_exact(value: Any) -> bool:
    """Whether `value` holds only lists, tuples and dicts (of those exact types) of `EXACT` values. The types of a
    container's members are gathered in C (`set(map(type, ...))`), so that a list of token ids is not walked."""
    stack = [value]
    while stack:
        item = stack.pop()
        members = [*item, *item.values()] if type(item) is dict else item
        kinds = set(map(type, members))
        if kinds <= EXACT:
            continue
        if not kinds <= EXACT | CONTAINERS:
            return False
        stack += [m for m in members if type(m) in CONTAINERS]
    return True


def _is_number(text: str) -> bool:
    """Whether `str(int(text)) == text` (for at most 18 digits)."""
    return text.isdigit() and text.isascii() and (text[0] != "0" or text == "0") and len(text) <= 18


class CompactExamples(Sequence[Any]):
    """The examples appended, as bytes; `examples[i]`, slices, `len` and iteration as a list's, read-only. Equal
    to a list (or another `CompactExamples`) of equal examples in the same order."""

    __slots__ = (
        "_data",
        "_ending_index",
        "_endings",
        "_fields_of",
        "_first_source",
        "_flat_types",
        "_kept_whole",
        "_kind",
        "_offsets",
        "_source_index",
        "_sources",
        "_where_at",
    )

    def __init__(self) -> None:
        self._kind: type | None = None  # the dataclass of every compact example (one kind per collection)
        self._fields_of: Any = None
        self._where_at = 0
        self._flat_types: set[tuple[type, ...]] = set()  # field types that hold no list or dict: nothing to walk
        self._sources: list[str] = []
        self._first_source: str | None = None
        self._source_index: dict[str, int] = {}
        self._endings: list[str] = []
        self._ending_index: dict[str, int] = {}
        self._data = bytearray()
        self._offsets = array("q", [0])  # example i is _data[_offsets[i]:_offsets[i + 1]]
        self._kept_whole: dict[int, Any] = {}  # index -> an example marshal cannot write exactly

    # --- building ---------------------------------------------------------------------------------

    def append(self, example: Any) -> None:
        """Add an example (a frozen dataclass with a `where` field)."""
        if self._kind is None:
            self._set_kind(type(example))
        record = self._record(example) if type(example) is self._kind else None
        if record is None:
            self._kept_whole[len(self)] = example
            record = b""
        self._data += record
        self._offsets.append(len(self._data))

    def _set_kind(self, kind: type) -> None:
        names = [f.name for f in fields(kind)]
        self._kind, self._where_at = kind, names.index("where")
        names.remove("where")
        self._fields_of = attrgetter(*names)

    def _record(self, example: Any) -> bytes | None:
        values = self._fields_of(example)
        types = tuple(map(type, values))
        if types not in self._flat_types:
            if not _marshal_exact(values):
                return None
            if EXACT.issuperset(types):
                self._flat_types.add(types)
        where, first = example.where, self._first_source
        if first is not None and where.startswith(first) and _is_number(rest := where[len(first):]):
            code: Any = int(rest)
        else:
            code = self._where_code(where)
        try:
            return marshal.dumps((code, *values))
        except ValueError:  # nested too deep for marshal
            return None

    def _where_code(self, where: str) -> int | tuple[int, int, int] | str:
        """where's number alone (first source, no ending), (source, number, ending) indices, or where itself."""
        known = self._after_known_source(where)
        if known is not None:
            source_index, number, ending = known
        else:
            if (match := ROW_WHERE.fullmatch(where) or NUMBERED.fullmatch(where)) is None:
                return where
            source, number, ending = match.groups()
            if len(self._sources) == MAX_SOURCES:
                return where
            source_index = self._index(source, self._sources, self._source_index)
            self._first_source = self._sources[0]
        if source_index == 0 and not ending:
            return int(number)
        if ending not in self._ending_index and len(self._endings) == MAX_ENDINGS:
            return where
        return source_index, int(number), self._index(ending, self._endings, self._ending_index)

    def _after_known_source(self, where: str) -> tuple[int, str, str] | None:
        for i, source in enumerate(self._sources):
            if where.startswith(source) and (match := AFTER_SOURCE.fullmatch(where, len(source))):
                return i, *match.groups()
        return None

    @staticmethod
    def _index(text: str, table: list[str], index: dict[str, int]) -> int:
        if text not in index:
            index[text] = len(table)
            table.append(text)
        return index[text]

    # --- reading ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @overload
    def __getitem__(self, i: int) -> Any: ...

    @overload
    def __getitem__(self, i: slice) -> CompactExamples: ...

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            part = CompactExamples()
            for j in range(*i.indices(len(self))):
                part.append(self._example(j))
            return part
        n = len(self)
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise IndexError("CompactExamples index out of range")
        return self._example(j)

    def __iter__(self) -> Iterator[Any]:
        for j in range(len(self)):
            yield self._example(j)

    def _example(self, j: int) -> Any:
        if j in self._kept_whole:
            return self._kept_whole[j]
        code, *values = marshal.loads(self._data[self._offsets[j]:self._offsets[j + 1]])
        if isinstance(code, int):
            where = f"{self._sources[0]}{code}"
        elif isinstance(code, tuple):
            where = f"{self._sources[code[0]]}{code[1]}{self._endings[code[2]]}"
        else:
            where = code
        values.insert(self._where_at, where)
        return self._kind(*values)  # type: ignore[misc]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompactExamples | list):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        kind = self._kind.__name__ if self._kind is not None else "example"
        return f"<CompactExamples: {len(self)} {kind}, {len(self._data)} bytes>"

    # --- pickling ---------------------------------------------------------------------------------

    def __reduce__(self) -> tuple[Any, ...]:
        state = (self._kind, self._sources, self._endings, self._data, self._offsets, self._kept_whole)
        return _restore, state


def _restore(kind: type | None, sources: list[str], endings: list[str], data: bytearray, offsets: array,
             kept_whole: dict[int, Any]) -> CompactExamples:
    examples = CompactExamples()
    if kind is not None:
        examples._set_kind(kind)
    examples._sources, examples._source_index = sources, {s: i for i, s in enumerate(sources)}
    examples._first_source = sources[0] if sources else None
    examples._endings, examples._ending_index = endings, {e: i for i, e in enumerate(endings)}
    examples._data, examples._offsets, examples._kept_whole = data, offsets, kept_whole
    return examples
