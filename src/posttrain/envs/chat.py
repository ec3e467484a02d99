"""A chat episode kept token-exact: the messages, and the ids the model has seen, extended turn by turn.

The context of the next turn is the chat template's rendering of the whole conversation so far (with the new
messages and the generation prompt), tokenised, and checked to extend the ids so far: the prompt, every id the
model sampled and every observation id, exactly. When it does, the new ids after them are the observation. When it
does not (the template rewrites earlier turns: Qwen3 drops the thinking of turns before the last user message, a
template re-serialises a tool call's JSON, or the model sampled a tokenisation that the template's text does not
tokenise back to), the rendering becomes the next turn's whole context and the episode is split there into another
training sample (`StepResult.context_ids`), counted in `splits`. No id is ever trained that was not the one sampled
after exactly the context it was sampled in (slime #1563 and #2263, prime-rl #1334, verl #3960).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Message = dict[str, Any]


def conversation_of(prompt: Any) -> list[Message]:
    """A row's prompt as messages: a conversation as it is, a string as one user message."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Sequence) and all(isinstance(m, Mapping) for m in prompt):
        return [dict(m) for m in prompt]
    raise ValueError(f"the row's prompt must be text or a list of messages, got {type(prompt).__name__}")


def render_chat_ids(tokenizer: Any, messages: list[Message], *, tools: list[dict[str, Any]] | None = None,
                    template_kwargs: Mapping[str, Any] | None = None, add_generation_prompt: bool = True) -> list[int]:
    """The ids of a conversation as the chat template renders it (with `tools`), tokenised without special tokens
    (the template writes its own)."""
    text = tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **dict(template_kwargs or {}))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # fmt: skip


def model_turn_text(tokenizer: Any, completion_ids: list[int]) -> tuple[str, bool]:
    """A model turn's text (special tokens kept: `[TOOL_CALLS]` is one) and whether it ended on the stop token (EOS),
    which is left out of the text."""
    ended = bool(completion_ids) and completion_ids[-1] == tokenizer.eos_token_id
    body = completion_ids[:-1] if ended else completion_ids
    return tokenizer.decode(body, skip_special_tokens=False), ended


class ChatTranscript:
    """One episode's messages and the exact ids of its context (see the module docstring)."""

    def __init__(self, tokenizer: Any, *, tools: list[dict[str, Any]] | None = None,
                 template_kwargs: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("a chat environment needs a tokenizer with a chat_template (tokenizer.chat_template)")
        self.tokenizer, self.tools, self.template_kwargs = tokenizer, tools or None, dict(template_kwargs or {})
        self.messages: list[Message] = []
        self.prompt_length = 0
        self.ids: list[int] = []
        self.splits = 0

    def render_ids(self, messages: list[Message], *, add_generation_prompt: bool = True) -> list[int]:
        return render_chat_ids(self.tokenizer, messages, tools=self.tools, template_kwargs=self.template_kwargs,
                               add_generation_prompt=add_generation_prompt)  # fmt: skip

    def start(self, messages: list[Message]) -> list[int]:
        """The prompt's ids: the conversation rendered with the tools and the generation prompt."""
        self.messages, self.prompt_length = list(messages), len(messages)
        self.ids = self.render_ids(self.messages)
        return list(self.ids)

    def model_text(self, completion_ids: list[int]) -> tuple[str, bool]:
        """The text of a model turn (special tokens kept: `[TOOL_CALLS]` is one) and whether it ended on the stop
        token (EOS), which is left out of the text; the ids join the context."""
        self.ids += completion_ids
        return model_turn_text(self.tokenizer, completion_ids)

    def extend(self, new_messages: list[Message]) -> tuple[list[int], list[int] | None]:
        """Append messages; return (observation ids, None) when the rendering extends the ids so far, else
        ([], the whole new context) and count a split."""
        self.messages += new_messages
        rendered = self.render_ids(self.messages)
        if rendered[: len(self.ids)] == self.ids:
            observation, self.ids = rendered[len(self.ids) :], rendered
            return observation, None
        self.ids = rendered
        self.splits += 1
        return [], list(rendered)

    def close(self, final_messages: list[Message]) -> None:
        """The episode's last messages, which no further turn is rendered after."""
        self.messages += final_messages

    @property
    def completion_messages(self) -> list[Message]:
        """The messages after the prompt: what reward functions receive as the completion."""
        return self.messages[self.prompt_length :]
