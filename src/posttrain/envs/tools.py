"""Tools: typed Python functions the model calls, their JSON schemas, and running a turn's calls safely.

A tool is a function with type hints and a Google-style docstring (a line of description, then `Args:` with one
line per parameter); its schema is read from both exactly as transformers does for `apply_chat_template(tools=)`
(`transformers.utils.get_json_schema`), so the template shows the model what a real one would:

    def calculator(expression: str) -> str:
        \"\"\"Evaluate an arithmetic expression.

        Args:
            expression: The expression, e.g. "37*58".
        \"\"\"

`ToolSet.run(calls)` runs one turn's calls concurrently, each on its own daemon thread with its own time limit.
Whatever a call does, it becomes a result string, never an exception: an unknown tool, arguments that do not fit
the signature, a tool that raises, one that passes its `timeout_s` (its thread is abandoned; a tool that runs
programs bounds them itself, as the Python tool does through the sandbox) and output longer than
`max_output_chars` (cut, and said) each give an error observation and are counted by kind (`ToolResult.error`).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from posttrain.envs.parsers import ToolCall

ERROR_KINDS = ("unknown_tool", "bad_arguments", "raised", "timeout", "too_long", "malformed", "too_many_calls")
"""How a call can fail, as counted in an episode's info (`tool_errors/<kind>`)."""
MAX_ERROR_CHARS = 1000
"""An error observation (a tool's exception message included) is cut to this many characters."""


@dataclass(frozen=True)
class Tool:
    """A callable with its name, JSON schema and limits."""

    name: str
    fn: Callable[..., Any]
    schema: dict[str, Any]
    """{"type": "function", "function": {"name", "description", "parameters"}}, as chat templates take it."""
    timeout_s: float = 10.0
    max_output_chars: int = 2000

    @staticmethod
    def from_function(fn: Callable[..., Any], *, name: str | None = None, timeout_s: float = 10.0,
                      max_output_chars: int = 2000) -> Tool:  # fmt: skip
        """The tool of a typed, documented function; its schema from its signature and docstring."""
        from transformers.utils import get_json_schema

        schema = get_json_schema(fn)
        if name is not None:
            schema["function"]["name"] = name
        return Tool(schema["function"]["name"], fn, schema, timeout_s, max_output_chars)


@dataclass
class ToolResult:
    """One call's outcome: the text the model reads, and the error kind if it failed."""

    name: str
    content: str
    error: str | None = None
    seconds: float = 0.0


def as_text(value: Any) -> str:
    """A tool's return value as the observation text: strings as they are, JSON for the rest."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def check_arguments(tool: Tool, arguments: dict[str, Any]) -> str | None:
    """Why `arguments` do not fit the tool's signature, or None: an unknown name or a missing required one."""
    parameters = tool.schema["function"].get("parameters", {})
    known, required = set(parameters.get("properties", {})), set(parameters.get("required", []))
    unknown, missing = sorted(set(arguments) - known), sorted(required - set(arguments))
    if unknown:
        return f"{tool.name} takes no argument {', '.join(unknown)}; its arguments: {', '.join(sorted(known))}"
    if missing:
        return f"{tool.name} needs the argument {', '.join(missing)}"
    return None


class ToolSet:
    """The tools an environment offers, by name."""

    def __init__(self, tools: Iterable[Tool]) -> None:
        self.tools = {t.name: t for t in tools}

    @property
    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema for t in self.tools.values()]

    def run(self, calls: list[ToolCall]) -> list[ToolResult]:
        """Every call at once, each within its tool's time limit; results in the calls' order."""
        slots: list[ToolResult | None] = [None] * len(calls)
        threads = []
        for i, call in enumerate(calls):
            tool = self.tools.get(call.name)
            if tool is None:
                known = ", ".join(sorted(self.tools)) or "none"
                slots[i] = ToolResult(call.name, f"error: no tool named {call.name!r}; tools: {known}", "unknown_tool")
                continue
            problem = check_arguments(tool, call.arguments)
            if problem is not None:
                slots[i] = ToolResult(call.name, f"error: {problem}", "bad_arguments")
                continue
            thread = threading.Thread(target=_call_into, args=(tool, call.arguments, slots, i), daemon=True,
                                      name=f"posttrain-tool-{tool.name}")  # fmt: skip
            thread.start()
            threads.append((i, tool, thread, time.monotonic()))
        for i, tool, thread, started in threads:
            thread.join(max(0.0, started + tool.timeout_s - time.monotonic()))
            if slots[i] is None:  # still running: abandoned, its late result is never read
                slots[i] = ToolResult(tool.name, f"error: {tool.name} did not return within {tool.timeout_s:g} s",
                                      "timeout", tool.timeout_s)  # fmt: skip
        return [_bounded(self.tools.get(r.name), r) for r in slots]  # type: ignore[arg-type]


def _call_into(tool: Tool, arguments: dict[str, Any], slots: list[ToolResult | None], i: int) -> None:
    started = time.monotonic()
    try:
        text, error = as_text(tool.fn(**arguments)), None
    except BaseException as err:  # a tool's sys.exit() or KeyboardInterrupt in its thread is its own failure
        text, error = f"error: {type(err).__name__}: {err}", "raised"
    if slots[i] is None:
        slots[i] = ToolResult(tool.name, text, error, time.monotonic() - started)


def _bounded(tool: Tool | None, result: ToolResult) -> ToolResult:
    """A tool's output cut to its `max_output_chars` (counted `too_long`); an error message to MAX_ERROR_CHARS."""
    limit = MAX_ERROR_CHARS if result.error is not None or tool is None else tool.max_output_chars
    if len(result.content) <= limit:
        return result
    cut = f"{result.content[:limit]}... [cut: {len(result.content)} characters, the limit is {limit}]"
    return ToolResult(result.name, cut, result.error or "too_long", result.seconds)


@dataclass
class ToolCounts:
    """An episode's tool calls and their failures by kind."""

    calls: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str | None) -> None:
        if kind is not None:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def info(self) -> dict[str, int]:
        return {"tool_calls": self.calls, "tool_errors": sum(self.errors.values()),
                **{f"tool_errors/{k}": v for k, v in self.errors.items()}}  # fmt: skip

