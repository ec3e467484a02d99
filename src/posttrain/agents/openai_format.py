"""OpenAI chat-completions requests in, responses out: what the endpoint reads and writes, with no I/O.

A request's messages become the messages a Hugging Face chat template takes: an assistant message's `tool_calls`
keep their ids and get their `arguments` JSON string decoded into an object (templates write it with `tojson`; a
string would be written twice quoted), `content` given as parts (`[{"type": "text", "text": ...}]`) is joined, and
a missing or null `content` is "". The response is the model turn: its text, the tool calls the configured parser
reads in it (`envs.parsers`), `finish_reason` ("tool_calls", "stop" or "length"), `usage`, and, beyond OpenAI's
fields as vLLM's `return_token_ids` gives them, the prompt's and the completion's token ids.

A request the endpoint cannot serve is a `RequestError` naming the field: streaming, n > 1, a message without a
role, arguments that are not JSON.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from posttrain.envs.parsers import ParsedTurn

SAMPLING_FIELDS = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "stop")
"""The request fields that choose how a turn is sampled (the standalone endpoint honours them; in training the
run's `rl.sampling` decides, as on-policy RL needs)."""


class RequestError(ValueError):
    """A request the endpoint cannot serve; `status` is the HTTP status it answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ChatRequest:
    """A validated request: messages as chat templates take them, the tools' schemas, the sampling options set."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    model: str = ""
    sampling: dict[str, Any] = field(default_factory=dict)
    """The fields of SAMPLING_FIELDS the request set (None values dropped); `stop` as a tuple of strings."""
    logprobs: bool = False


def parse_request(body: Any) -> ChatRequest:
    """A request body (decoded JSON) -> ChatRequest; RequestError naming the field otherwise."""
    if not isinstance(body, Mapping):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    if body.get("stream"):
        raise RequestError("stream: streaming is not supported; send stream=false")
    if body.get("n") not in (None, 1):
        raise RequestError(f"n: {body.get('n')!r}; this endpoint returns one choice (n=1)")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: a non-empty list of messages is required")
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, Mapping) for t in tools)):
        raise RequestError("tools: must be a list of tool objects ({'type': 'function', 'function': {...}})")
    sampling = {key: body[key] for key in SAMPLING_FIELDS if body.get(key) is not None}
    if "stop" in sampling:
        stop = sampling["stop"]
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise RequestError("stop: a string or a list of non-empty strings")
        sampling["stop"] = tuple(stop)
    for key in ("temperature", "top_p"):
        if key in sampling and (isinstance(sampling[key], bool) or not isinstance(sampling[key], int | float)):
            raise RequestError(f"{key}: a number, got {sampling[key]!r}")
    for key in ("max_tokens", "max_completion_tokens"):
        if key in sampling and (isinstance(sampling[key], bool) or not isinstance(sampling[key], int)
                                or sampling[key] < 1):  # fmt: skip
            raise RequestError(f"{key}: a positive integer, got {sampling[key]!r}")
    return ChatRequest(
        messages=[template_message(m, f"messages[{i}]") for i, m in enumerate(messages)],
        tools=[dict(t) for t in tools] if tools else None,
        model=str(body.get("model") or ""),
        sampling=sampling,
        logprobs=bool(body.get("logprobs")),
    )


def template_message(message: Any, where: str) -> dict[str, Any]:
    """One OpenAI message -> the dict a chat template takes (see the module docstring)."""
    if not isinstance(message, Mapping):
        raise RequestError(f"{where}: a message must be an object, got {type(message).__name__}")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise RequestError(f"{where}: a message needs a 'role'")
    out: dict[str, Any] = {"role": role, "content": message_text(message.get("content"), where)}
    for key in ("name", "tool_call_id", "reasoning_content"):
        if message.get(key) is not None:
            out[key] = message[key]
    if message.get("tool_calls"):
        calls = message["tool_calls"]
        if not isinstance(calls, list):
            raise RequestError(f"{where}.tool_calls: must be a list")
        out["tool_calls"] = [template_tool_call(c, f"{where}.tool_calls[{k}]") for k, c in enumerate(calls)]
    return out


def message_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise RequestError(f"{where}.content: text, null, or a list of text parts ({{'type': 'text', 'text': ...}})")


def template_tool_call(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
        raise RequestError(f"{where}: a tool call needs a 'function' object with 'name' and 'arguments'")
    function = call["function"]
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as err:
            raise RequestError(f"{where}.function.arguments: not JSON ({err.msg})") from None
    out = {"type": "function", "function": {"name": function.get("name"), "arguments": arguments}}
    if call.get("id") is not None:
        out["id"] = call["id"]
    return out


def assistant_message(turn: ParsedTurn, text: str, call_ids: list[str]) -> dict[str, Any]:
    """The model turn as the OpenAI message the response carries: its text (the text before its calls when it makes
    any, null when that is empty) and its calls, arguments as JSON strings."""
    if not turn.calls:
        return {"role": "assistant", "content": text}
    calls = [{"id": call_id, "type": "function",
              "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
             for call_id, c in zip(call_ids, turn.calls)]  # fmt: skip
    return {"role": "assistant", "content": turn.content or None, "tool_calls": calls}


def finish_reason(turn: ParsedTurn, ended: bool) -> str:
    """OpenAI's finish reason: "length" when the turn did not reach its stop token, "tool_calls" when it calls."""
    if not ended:
        return "length"
    return "tool_calls" if turn.calls else "stop"


def completion_response(
    *, response_id: str, model: str, message: dict[str, Any], finish: str, prompt_ids: list[int],
    completion_ids: list[int], logprobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The `chat.completion` object of one choice."""
    choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish,
                              "logprobs": None if logprobs is None else {"content": logprobs},
                              "token_ids": list(completion_ids)}  # fmt: skip
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": len(completion_ids),
            "total_tokens": len(prompt_ids) + len(completion_ids),
        },
        "prompt_token_ids": list(prompt_ids),
    }


def token_logprobs(tokenizer: Any, completion_ids: list[int], logprobs: list[float]) -> list[dict[str, Any]]:
    """OpenAI's `logprobs.content`: each sampled token's text, log-prob and bytes (no alternatives)."""
    out = []
    for token_id, logprob in zip(completion_ids, logprobs):
        token = tokenizer.decode([token_id], skip_special_tokens=False)
        out.append({"token": token, "logprob": logprob if math.isfinite(logprob) else -9999.0,
                    "bytes": list(token.encode("utf-8")), "top_logprobs": []})  # fmt: skip
    return out


def models_response(model: str) -> dict[str, Any]:
    """GET /v1/models: the one model served."""
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "posttrain"}]}
