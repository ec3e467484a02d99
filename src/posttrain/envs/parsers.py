"""Tool-call parsers: a model turn's text -> the tool calls it makes, its other text, and what could not be read.

    TOOL_PARSERS["hermes"](text) -> ParsedTurn(content, calls, errors)

- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call (Qwen2.5, Qwen3,
  Hermes);
- `llama3_json`: the turn is `{"name": ..., "parameters": {...}}`, or several joined by `;`, optionally after
  `<|python_tag|>` (Llama 3.1 to 3.3);
- `mistral`: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]` (Mistral 7B v0.3, Mixtral, Nemo).

A call that cannot be read (bad JSON, no name, arguments that are not an object, an unclosed block) is an error
string in `errors`, never an exception: the environment answers it with an error observation and counts it.
A user registers a parser with `@tool_parser("name")` on a function `str -> ParsedTurn`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ToolCall:
    """One call: the tool's name and its arguments (a JSON object)."""

    name: str
    arguments: dict[str, Any]


@dataclass
class ParsedTurn:
    content: str
    """The turn's text outside its calls (before the first call)."""
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    """One message per call that could not be read."""


TOOL_PARSERS: dict[str, Callable[[str], ParsedTurn]] = {}


def tool_parser(name: str) -> Callable[[Callable[[str], ParsedTurn]], Callable[[str], ParsedTurn]]:
    """Register a parser under `name` (a user's too)."""

    def register(fn: Callable[[str], ParsedTurn]) -> Callable[[str], ParsedTurn]:
        if name in TOOL_PARSERS and TOOL_PARSERS[name] is not fn:
            raise ValueError(f"tool parser '{name}' is already registered; choose another name")
        TOOL_PARSERS[name] = fn
        return fn

    return register


def get_parser(name: str) -> Callable[[str], ParsedTurn]:
    if name not in TOOL_PARSERS:
        known = ", ".join(sorted(TOOL_PARSERS))
        raise ValueError(f"parser: '{name}' is not a registered tool parser; registered: {known}")
    return TOOL_PARSERS[name]


def read_call(payload: Any, arguments_key: str = "arguments") -> ToolCall:
    """A call from decoded JSON: {"name": str, arguments_key: object or a JSON string of one}. Raises ValueError."""
    if not isinstance(payload, dict):
        raise ValueError(f"a call must be a JSON object, got {type(payload).__name__}")
    name = payload.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("a call has no \"name\" string")
    arguments = payload.get(arguments_key, payload.get("arguments", payload.get("parameters", {})))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as err:
            raise ValueError(f"call {name!r}: its arguments string is not JSON ({err.msg})") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"call {name!r}: arguments must be a JSON object, got {type(arguments).__name__}")
    return ToolCall(name, arguments)


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON ({err.msg} at character {err.pos}): {text[:80]!r}") from None


_HERMES = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)


@tool_parser("hermes")
def parse_hermes(text: str) -> ParsedTurn:
    """`<tool_call>{json}</tool_call>` blocks; an unclosed last block is an error."""
    start = text.find("<tool_call>")
    if start < 0:
        return ParsedTurn(text)
    turn = ParsedTurn(text[:start].rstrip())
    for match in _HERMES.finditer(text, start):
        if not match.group(2):
            turn.errors.append(f"an unclosed <tool_call>: {match.group(1)[:80]!r}")
            continue
        try:
            turn.calls.append(read_call(_loads(match.group(1).strip())))
        except ValueError as err:
            turn.errors.append(str(err))
    return turn


@tool_parser("llama3_json")
def parse_llama3_json(text: str) -> ParsedTurn:
    """The whole turn is one JSON call or several joined by `;` (after an optional `<|python_tag|>`); a turn that
    does not start with `{` is a plain answer."""
    body = text.strip()
    if body.startswith("<|python_tag|>"):
        body = body.removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return ParsedTurn(text)
    turn = ParsedTurn("")
    decoder, at = json.JSONDecoder(), 0
    while at < len(body):
        try:
            payload, end = decoder.raw_decode(body, at)
            turn.calls.append(read_call(payload, "parameters"))
        except json.JSONDecodeError as err:
            turn.errors.append(f"not JSON ({err.msg} at character {err.pos}): {body[at:at + 80]!r}")
            break
        except ValueError as err:
            turn.errors.append(str(err))
            break
        at = end
        while at < len(body) and body[at] in " \n\t;":
            at += 1
    return turn


@tool_parser("mistral")
def parse_mistral(text: str) -> ParsedTurn:
    """`[TOOL_CALLS]` then a JSON array of calls."""
    start = text.find("[TOOL_CALLS]")
    if start < 0:
        return ParsedTurn(text)
    turn = ParsedTurn(text[:start].rstrip())
    body = text[start + len("[TOOL_CALLS]") :].strip()
    try:
        payload, _ = json.JSONDecoder().raw_decode(body)
    except json.JSONDecodeError as err:
        turn.errors.append(f"not JSON ({err.msg} at character {err.pos}): {body[:80]!r}")
        return turn
    for item in payload if isinstance(payload, list) else [payload]:
        try:
            turn.calls.append(read_call(item))
        except ValueError as err:
            turn.errors.append(str(err))
    return turn
