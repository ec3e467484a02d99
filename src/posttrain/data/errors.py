"""The one error type of `posttrain.data`: a bad file, row or field, named where it is; and how its messages
show a value, in a few dozen characters whatever its size (a row may hold megabytes)."""

import reprlib
from typing import Any

_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel, _REPR.maxlist = 50, 50, 3, 12


class DataError(ValueError):
    """An input problem, with its place in the message: `"<file> line 3: field 'label': ..."`.

    `reason` is a short stable key ("missing field", "wrong type", ...) under which a skipped row is
    counted in `LoadReport.skipped`.
    """

    def __init__(self, message: str, *, reason: str = "unreadable"):
        super().__init__(message)
        self.reason = reason


def show_value(value: Any, limit: int = 60) -> str:
    """`repr(value)` cut to `limit` characters, built without visiting more of `value` than is shown."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def show_names(fields: Any, shown: int = 20) -> str:
    """The sorted names of a mapping's keys, the first `shown` of them and how many more there are."""
    names = sorted(map(str, fields))
    more = len(names) - shown
    return str(names) if more <= 0 else f"{names[:shown]} and {more} more"
