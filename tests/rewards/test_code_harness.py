"""The code reward's wire format: the checker decodes the solution's answers into its own exact built-in types."""

from __future__ import annotations

import collections
import json
import math
import os
from decimal import Decimal
from fractions import Fraction

import pytest

from posttrain.rewards.code_harness import (
    MAX_DEPTH,
    MAX_FRAME_BYTES,
    Server,
    WireError,
    _exception,
    decode,
    encode,
    plain_only,
    receive,
    send,
)


def no_remote(ref):
    raise AssertionError(f"unexpected remote object {ref}")


def through_the_wire(value, ref=plain_only):
    return decode(json.loads(json.dumps(encode(value, ref))), no_remote)


def same(a, b) -> bool:
    """Equal with the same exact types all the way down (NaN equal to NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b and (not isinstance(a, float) or math.copysign(1, a) == math.copysign(1, b))


Point = collections.namedtuple("Point", "x y")


@pytest.mark.parametrize("value", [
    None, True, False, 0, -7, 2**53, 2**53 + 1, -(3**200), 1.5, -0.0, math.inf, -math.inf, math.nan, 1e-310,
    complex(1, -2), "", "é\ud800", b"\x00\xff", bytearray(b"ab"), [1, [2, [3]]], (1, (2.0, "x")), {"a": [1], 2: None},
    {1, 2}, frozenset({"a"}), Fraction(-1, 3), Decimal("1.10"), [(), {}, set(), b""],
])
def test_plain_values_cross_exactly(value):
    assert same(through_the_wire(value), value)


def test_subclasses_arrive_as_their_base_types_data():
    class Anything(list):
        def __eq__(self, other):
            return True

    class Seven(int):
        def __eq__(self, other):
            return True

    got = through_the_wire([Anything([1]), Seven(7), collections.OrderedDict(a=1), collections.Counter("aab")])
    assert same(got, [[1], 7, {"a": 1}, {"a": 2, "b": 1}])  # exact list, int and dicts: their __eq__ stayed behind
    assert got[0] != [2]


def test_a_namedtuple_keeps_its_fields():
    got = through_the_wire(Point(3, 4))
    assert got == (3, 4) and got.x == 3 and got._fields == ("x", "y")  # a class of the checker's own


def test_other_objects_stay_with_the_server_as_references():
    server = Server()
    assert encode([object(), len], server.ref) == [{"r": 0}, {"r": 1}]
    with pytest.raises(TypeError, match="cannot send a function"):
        encode(lambda: 0, plain_only)


def test_a_value_nested_too_deeply_becomes_a_reference_in_the_server():
    deep: list = []
    for _ in range(MAX_DEPTH + 5):
        deep = [deep]
    server = Server()
    assert server.encode_answer(deep) == {"r": 0}
    cycle: list = []
    cycle.append(cycle)
    assert server.encode_answer(cycle) == {"r": 1}


@pytest.mark.parametrize("data", [
    {"x": 1},  # unknown tag
    {"t": [], "s": []},  # two keys
    {"i": "f" * 200_000},  # an int too large to decode cheaply
    {"d": [[1]]},  # a dict item that is not a pair
    {"s": [[1]]},  # an unhashable set member
    {"nt": ["P", ["_bad"], [1]]},  # not a namedtuple field name
    {"c": ["1", 2]},  # complex parts must be numbers
    {"fr": [1, 0]},  # a zero denominator
])
def test_decode_refuses_what_is_not_wire_data(data):
    with pytest.raises(WireError):
        decode(data, no_remote)


def test_decode_refuses_nesting_past_the_limit():
    data: list = []
    for _ in range(MAX_DEPTH + 1):
        data = [data]
    with pytest.raises(WireError, match="nested deeper"):
        decode(data, no_remote)


def test_messages_are_length_prefixed_and_bounded():
    r, w = os.pipe()
    try:
        send(w, {"op": "len", "ref": 0})
        assert receive(r) == {"op": "len", "ref": 0}
        os.write(w, (MAX_FRAME_BYTES + 1).to_bytes(4, "big"))
        with pytest.raises(WireError, match="over the"):
            receive(r)
        os.write(w, (2).to_bytes(4, "big") + b"[]")
        with pytest.raises(WireError, match="JSON object"):
            receive(r)
    finally:
        os.close(w)
    with pytest.raises(EOFError):
        receive(r)
    os.close(r)


def test_the_solutions_exceptions_become_the_checkers_own():
    assert type(_exception("ValueError", "bad", op="call")) is ValueError
    assert type(_exception("StopIteration", "", op="next")) is StopIteration
    # outside next(), and for what is not an ordinary built-in exception, a SolutionError
    for name in ("StopIteration", "SystemExit", "KeyboardInterrupt", "MyError", "UnicodeDecodeError"):
        assert type(_exception(name, "x", op="call")).__name__ == "SolutionError"
