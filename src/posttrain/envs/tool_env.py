"""A tool-using chat environment: the model calls tools over several turns, then answers.

Each model turn is parsed for tool calls (`parsers`); with calls, the assistant message carries them as
`tool_calls` (the OpenAI / TRL message format), the calls run concurrently within their limits (`tools.ToolSet`),
each result becomes a `tool` message, and the next turn's context is the chat template's rendering of it all,
token-exact or split (`chat.ChatTranscript`). A turn without calls is the answer and ends the episode; so does a
turn that did not reach the stop token (cut by max_new_tokens). A malformed call, an unknown tool, a tool that
raises, hangs or returns a huge output, and calls past `max_tool_calls` per turn each get an error observation
and are counted (`info["tool_errors/<kind>"]`), never a crash.

    env: {name: calculator, args: {parser: hermes, max_tool_calls: 2}}
    env: {name: tools, args: {tools: [calculator, python], tool_args: {python: {timeout_s: 5}}}}
    env: {name: search, args: {corpus: docs.txt, k: 3}}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from posttrain.envs.base import StepResult
from posttrain.envs.builtin_tools import TOOLS
from posttrain.envs.chat import ChatTranscript, Message, conversation_of
from posttrain.envs.parsers import ParsedTurn, ToolCall, get_parser
from posttrain.envs.tools import Tool, ToolCounts, ToolResult, ToolSet


def build_tools(tools: Sequence[str | Tool | Callable[..., Any]], tool_args: Mapping[str, Mapping[str, Any]],
                base_dir: str | Path | None) -> ToolSet:  # fmt: skip
    """Built-in tools by name (with their `tool_args`), `Tool`s, and plain typed functions."""
    built = []
    for tool in tools:
        if isinstance(tool, Tool):
            built.append(tool)
        elif callable(tool):
            built.append(Tool.from_function(tool))
        elif tool in TOOLS:
            args = dict(tool_args.get(tool, {}))
            if tool == "search":
                args.setdefault("base_dir", base_dir)
            built.append(TOOLS[tool](**args))
        else:
            raise ValueError(f"tools: '{tool}' is not a built-in tool; built-ins: {', '.join(sorted(TOOLS))}")
    return ToolSet(built)


class ToolEnv:
    """A chat episode with tools (see the module docstring)."""

    def __init__(
        self,
        tokenizer: Any,
        tools: Sequence[str | Tool | Callable[..., Any]] = ("calculator",),
        *,
        parser: str = "hermes",
        tool_args: Mapping[str, Mapping[str, Any]] | None = None,
        max_tool_calls: int = 4,
        system_prompt: str | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
        base_dir: str | Path | None = None,
    ) -> None:
        self.toolset = build_tools(tools, tool_args or {}, base_dir)
        self.parse = get_parser(parser)
        self.max_tool_calls, self.system_prompt = max_tool_calls, system_prompt
        self.transcript = ChatTranscript(tokenizer, tools=self.toolset.schemas, template_kwargs=template_kwargs)
        self.counts = ToolCounts()
        self.answered = False
        self.call_ids = 0

    def reset(self, row: dict[str, Any]) -> list[int]:
        messages = conversation_of(row["prompt"] if row.get("prompt") is not None else row["prompt_ids"])
        if self.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return self.transcript.start(messages)

    def step(self, completion_ids: list[int]) -> StepResult:
        text, ended = self.transcript.model_text(completion_ids)
        turn = self.parse(text)
        if not ended or (not turn.calls and not turn.errors):
            self.answered = ended
            self.transcript.close([{"role": "assistant", "content": text}])
            return StepResult([], done=True, info=self.info())
        calls = turn.calls[: self.max_tool_calls]
        results = self.toolset.run(calls)
        self.counts.calls += len(calls)
        for result in results:
            self.counts.add(result.error)
        errors = self.turn_errors(turn)
        messages = self.turn_messages(turn, calls, results, errors)
        observation, context = self.transcript.extend(messages)
        return StepResult(observation, done=False, info=self.info(), context_ids=context)

    def turn_errors(self, turn: ParsedTurn) -> list[ToolResult]:
        """Error observations for the calls that could not be read and those past max_tool_calls, counted."""
        errors = [ToolResult("error", f"error: malformed tool call: {e}", "malformed") for e in turn.errors]
        extra = len(turn.calls) - self.max_tool_calls
        if extra > 0:
            errors.append(ToolResult("error", f"error: at most {self.max_tool_calls} tool calls a turn; {extra} "
                                              "were not run", "too_many_calls"))  # fmt: skip
        for error in errors:
            self.counts.add(error.error)
        return errors

    def turn_messages(self, turn: ParsedTurn, calls: list[ToolCall], results: list[ToolResult],
                      errors: list[ToolResult]) -> list[Message]:  # fmt: skip
        """The assistant message with its tool calls, then one tool message per result and error."""
        ids = [f"call{self.call_ids + k:05d}" for k in range(len(results) + len(errors))]  # 9 characters: Mistral's
        self.call_ids += len(ids)
        assistant: Message = {"role": "assistant", "content": turn.content}
        if calls:
            assistant["tool_calls"] = [{"type": "function", "id": ids[k],
                                        "function": {"name": c.name, "arguments": c.arguments}}
                                       for k, c in enumerate(calls)]  # fmt: skip
        replies = [{"role": "tool", "name": r.name, "tool_call_id": ids[k], "content": r.content}
                   for k, r in enumerate([*results, *errors])]  # fmt: skip
        return [assistant, *replies]

    def info(self) -> dict[str, Any]:
        return {"messages": self.transcript.completion_messages, **self.counts.info(),
                "splits": self.transcript.splits, "answered": int(self.answered)}  # fmt: skip


class CalculatorEnv(ToolEnv):
    """`ToolEnv` with the calculator."""

    def __init__(self, tokenizer: Any, **kwargs: Any) -> None:
        super().__init__(tokenizer, ("calculator",), **kwargs)


class PythonEnv(ToolEnv):
    """`ToolEnv` with a Python interpreter in the code sandbox (`timeout_s`: each program's wall time)."""

    def __init__(self, tokenizer: Any, *, timeout_s: float = 10.0, **kwargs: Any) -> None:
        super().__init__(tokenizer, ("python",), tool_args={"python": {"timeout_s": timeout_s}}, **kwargs)


class SearchEnv(ToolEnv):
    """`ToolEnv` with a search over `corpus` (a text file of one passage a line, or a list of passages)."""

    def __init__(self, tokenizer: Any, *, corpus: str | Sequence[str], k: int = 3,
                 base_dir: str | Path | None = None, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(tokenizer, ("search",), tool_args={"search": {"corpus": corpus, "k": k}},
                         base_dir=base_dir, **kwargs)  # fmt: skip
