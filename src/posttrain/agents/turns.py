"""A request becomes prompt ids, a sampled turn becomes the response, and every call is recorded as ids.

    turns = ChatTurns(tokenizer, parser="hermes")
    prompt_ids = turns.prompt_ids(request)                       # the chat template's rendering, tools= included
    call = turns.record(request, prompt_ids, completion_ids, logprobs)
    call.response                                                # the chat.completion object to send back

The prompt is the template's rendering of the request's messages with the generation prompt, tokenised without
special tokens, as every chat environment renders a context (`envs.chat`); the turn's text is its ids decoded with
special tokens kept and the stop token left out, then parsed for tool calls by the configured parser.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from posttrain.agents.openai_format import (
    ChatRequest,
    assistant_message,
    completion_response,
    finish_reason,
    token_logprobs,
)
from posttrain.envs.chat import model_turn_text, render_chat_ids
from posttrain.envs.parsers import ParsedTurn, get_parser

MODEL_NAME = "posttrain"
"""The model name the endpoint reports (`/v1/models`) and answers under; a request may name any model."""


@dataclass
class CallRecord:
    """One chat-completions call: what the model was given and what it sampled, as ids."""

    messages: list[dict[str, Any]]
    """The request's messages as the chat template took them."""
    tools: list[dict[str, Any]] | None
    prompt_ids: list[int]
    """The rendering the model was sampled after."""
    completion_ids: list[int]
    """The ids sampled, the stop token included when it ended the turn."""
    logprobs: list[float] | None
    """Per completion token: log_softmax(logits / T)[token] at sampling (`Rollouts.logprobs`); None where the call
    was served inside a training episode, whose log-probs the episode's Rollouts hold."""
    message: dict[str, Any]
    """The assistant message as the chat template takes it (tool-call arguments as objects)."""
    response: dict[str, Any] = field(default_factory=dict)
    """The chat.completion object sent back."""

    def to_json(self) -> dict[str, Any]:
        return {"prompt_ids": self.prompt_ids, "completion_ids": self.completion_ids, "logprobs": self.logprobs,
                "messages": self.messages, "tools": self.tools, "message": self.message,
                "finish_reason": self.response["choices"][0]["finish_reason"]}  # fmt: skip


class ChatTurns:
    """Renders requests and builds responses for one tokenizer and tool-call parser (see the module docstring)."""

    def __init__(self, tokenizer: Any, *, parser: str = "hermes", template_kwargs: Mapping[str, Any] | None = None,
                 model_name: str = MODEL_NAME) -> None:  # fmt: skip
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the chat endpoint needs a tokenizer with a chat_template (tokenizer.chat_template)")
        self.tokenizer, self.parse, self.model_name = tokenizer, get_parser(parser), model_name
        self.template_kwargs = dict(template_kwargs or {})

    def prompt_ids(self, request: ChatRequest) -> list[int]:
        return render_chat_ids(self.tokenizer, request.messages, tools=request.tools,
                               template_kwargs=self.template_kwargs)  # fmt: skip

    def turn(self, completion_ids: list[int]) -> tuple[str, ParsedTurn, bool]:
        """The turn's text, its parsed calls (none for a turn cut before its stop token) and whether it ended."""
        text, ended = model_turn_text(self.tokenizer, completion_ids)
        return text, self.parse(text) if ended else ParsedTurn(text), ended

    def record(self, request: ChatRequest, prompt_ids: list[int], completion_ids: list[int],
               logprobs: list[float] | None) -> CallRecord:  # fmt: skip
        """The call's record, its response included."""
        text, turn, ended = self.turn(completion_ids)
        call_ids = [secrets.token_hex(5)[:9] for _ in turn.calls]  # 9 characters: what Mistral's template requires
        message = assistant_message(turn, text, call_ids)
        with_logprobs = token_logprobs(self.tokenizer, completion_ids, logprobs) if request.logprobs and logprobs \
            else None  # fmt: skip
        response = completion_response(
            response_id=f"chatcmpl-{secrets.token_hex(12)}", model=request.model or self.model_name, message=message,
            finish=finish_reason(turn, ended), prompt_ids=prompt_ids, completion_ids=completion_ids,
            logprobs=with_logprobs,
        )  # fmt: skip
        template_message = {"role": "assistant", "content": message["content"] or ""}
        if turn.calls:
            template_message["tool_calls"] = [{"type": "function", "id": i, "function": {"name": c.name,
                                                                                        "arguments": c.arguments}}
                                              for i, c in zip(call_ids, turn.calls)]  # fmt: skip
        return CallRecord(request.messages, request.tools, list(prompt_ids), list(completion_ids), logprobs,
                          template_message, response)  # fmt: skip
