"""Examples -> token ids and loss masks, with a Hugging Face tokenizer.

Tokenisation choices (one rule each, so training sees what generation sees):

- Text prompt + completion: the prompt is tokenised alone with the tokenizer's special tokens (BOS...),
  exactly as `encode_prompt` gives it to the generator; the completion is tokenised alone without
  special tokens and appended, then EOS unless the completion already ends with it. The training
  sequence is `prompt_ids + completion_ids`; the joined string is never re-tokenised, so there is no
  drift at the boundary between the prompt the model is given and the tokens it learns to produce.
- Conversations are rendered with `tokenizer.apply_chat_template` to text and that text is tokenised
  without special tokens (the template writes its own). A conversational prompt is rendered with
  `add_generation_prompt=True`; a completion is the rendered whole minus the rendered prompt.
- Multi-turn assistant masks: each assistant turn's character span is found by rendering prefixes
  (`messages[:i]` with the generation prompt, then `messages[:i + 1]`), and a token is a target when
  its first character lies in a span (offsets of one tokenisation of the whole text), up to and
  including the turn's EOS (what the template writes after EOS, e.g. ChatML's newline, is context).
  A conversational completion likewise ends at its EOS. This works with
  any template that renders a conversation's prefixes as prefixes of its rendering; one that does not
  (a template that rewrites earlier turns) is reported as an error. It needs no `{% generation %}`
  markers, which most templates lack.
- EOS: appended to a text completion, and after the last assistant turn of a conversation when the
  template wrote no EOS inside it (ChatML templates whose EOS is `<|im_end|>` write it themselves).
- `loss_mask[t]` is True when token t is a target, i.e. predicted by the logits at t - 1. Position 0
  of every sequence is never a target (nothing predicts it), which also keeps packed documents apart.

Truncation (`max_length`, `truncation="truncate" | "drop"`, counted in `LoadReport`):
- SFT: keep the first `max_length` tokens (the right end is cut, as TRL does); an example left with no
  target token is dropped.
- preference / unpaired / listwise: the prompt is kept whole and each completion is cut to
  `max_length - len(prompt_ids)`; when the prompt leaves no room the example is dropped.
- prompt-only: keep the last `max_length` tokens (the start is cut, as TRL's `max_prompt_length`),
  so the generation prompt at the end survives.
"""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from posttrain.data.errors import DataError
from posttrain.data.examples import (
    Content,
    Conversation,
    ListwiseExample,
    PreferenceExample,
    PromptExample,
    SFTExample,
    UnpairedExample,
)
from posttrain.data.report import LoadReport

Truncation = Literal["truncate", "drop"]


@dataclass(frozen=True)
class SFTTokens:
    """One SFT sequence: `input_ids` [T] and `loss_mask` [T] (True where the token is a target)."""

    input_ids: list[int]
    loss_mask: list[bool]
    where: str

    @property
    def num_targets(self) -> int:
        return sum(self.loss_mask)


@dataclass(frozen=True)
class PreferenceTokens:
    """A pair: the model sees `prompt_ids + chosen_ids` and `prompt_ids + rejected_ids`."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    where: str


@dataclass(frozen=True)
class CompletionTokens:
    """Prompt and completions scored as a whole (unpaired: one completion and its label; listwise:
    several completions and their scores)."""

    prompt_ids: list[int]
    completion_ids: list[list[int]]
    where: str
    label: bool | None = None
    scores: list[float] | None = None


@dataclass(frozen=True)
class PromptTokens:
    """A prompt for generation, with the row's other columns (`answer`, ...) verbatim."""

    prompt_ids: list[int]
    where: str
    extra: dict[str, Any] = field(default_factory=dict)
    prompt: Content | None = None
    """The row's prompt as written (text, or a conversation): what reward functions receive, as TRL passes it."""


# --- rendering and tokenising -------------------------------------------------------------------------

def render_chat(tokenizer: Any, messages: Conversation, *, add_generation_prompt: bool, where: str) -> str:
    """The chat template's text for `messages`. Raises DataError when the tokenizer has no template."""
    if not getattr(tokenizer, "chat_template", None):  # None, or an empty template that renders nothing
        raise DataError(f"{where}: the row is conversational but the tokenizer has no chat_template; "
                        "give the tokenizer one (tokenizer.chat_template = ...) or use text fields",
                        reason="no chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def tokenize_text(tokenizer: Any, text: str, *, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def encode_prompt(tokenizer: Any, prompt: Content | None, *, where: str) -> list[int]:
    """Prompt ids exactly as the generator receives them. None: the tokenizer's leading specials only."""
    if prompt is None:
        return tokenize_text(tokenizer, "", add_special_tokens=True)
    if isinstance(prompt, str):
        return tokenize_text(tokenizer, prompt, add_special_tokens=True)
    text = render_chat(tokenizer, prompt, add_generation_prompt=True, where=where)
    return tokenize_text(tokenizer, text, add_special_tokens=False)


def encode_completion(tokenizer: Any, prompt: Content | None, completion: Content, *,
                      where: str) -> list[int]:
    """The ids that follow `encode_prompt(prompt)` for this completion, EOS included."""
    if isinstance(completion, str):
        ids = tokenize_text(tokenizer, completion, add_special_tokens=False)
        return _with_eos(ids, tokenizer.eos_token_id)
    prompt_text = render_chat(tokenizer, prompt, add_generation_prompt=True, where=where)
    whole_text = render_chat(tokenizer, [*prompt, *completion], add_generation_prompt=False, where=where)
    _require_prefix(prompt_text, whole_text, where)
    ids = tokenize_text(tokenizer, whole_text[len(prompt_text):], add_special_tokens=False)
    if tokenizer.eos_token_id not in ids:
        return [*ids, tokenizer.eos_token_id]
    return ids[:ids.index(tokenizer.eos_token_id) + 1]


def _with_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids if ids and ids[-1] == eos_id else [*ids, eos_id]


def _require_prefix(prefix: str, whole: str, where: str) -> None:
    if not whole.startswith(prefix):
        raise DataError(f"{where}: the chat template does not render this conversation's prefix as a prefix "
                        f"of the whole (prefix ends {prefix[-40:]!r}); completion tokens cannot be located. "
                        "Use a template that renders earlier turns unchanged", reason="chat template")


# --- SFT ----------------------------------------------------------------------------------------------

def encode_sft_example(tokenizer: Any, example: SFTExample, *, completion_only: bool = True) -> SFTTokens:
    """Token ids and loss mask of one demonstration (rules in the module docstring), not truncated."""
    if isinstance(example.completion, str) and example.prompt is None:
        ids = _with_eos(tokenize_text(tokenizer, example.completion, add_special_tokens=True),
                        tokenizer.eos_token_id)
        return SFTTokens(ids, _first_not_target([True] * len(ids)), example.where)
    if isinstance(example.completion, str):
        prompt_ids = encode_prompt(tokenizer, example.prompt, where=example.where)
        completion_ids = encode_completion(tokenizer, example.prompt, example.completion, where=example.where)
        mask = [not completion_only] * len(prompt_ids) + [True] * len(completion_ids)
        return SFTTokens(prompt_ids + completion_ids, _first_not_target(mask), example.where)
    prompt = example.prompt or []
    ids, mask = encode_conversation(tokenizer, [*prompt, *example.completion], first_target_turn=len(prompt),
                                    where=example.where)
    if not completion_only:
        mask = [True] * len(ids)
    return SFTTokens(ids, _first_not_target(mask), example.where)


def encode_conversation(tokenizer: Any, messages: Conversation, *, first_target_turn: int = 0,
                        where: str) -> tuple[list[int], list[bool]]:
    """Ids of the rendered conversation [T] and a mask [T], True on the tokens of every assistant turn
    at index >= first_target_turn (its content and end-of-turn marker), found by rendering prefixes."""
    text = render_chat(tokenizer, messages, add_generation_prompt=False, where=where)
    spans = [_assistant_span(tokenizer, messages, i, text, where)
             for i in range(first_target_turn, len(messages)) if messages[i]["role"] == "assistant"]
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    mask = [any(start <= begin < end for start, end in spans) for begin, _ in encoding["offset_mapping"]]
    mask = _end_targets_at_eos(ids, mask, tokenizer.eos_token_id)
    if tokenizer.eos_token_id not in _last_target_run(ids, mask):
        ids, mask = [*ids, tokenizer.eos_token_id], [*mask, True]
    return ids, mask


def _assistant_span(tokenizer: Any, messages: Conversation, i: int, text: str, where: str) -> tuple[int, int]:
    before = render_chat(tokenizer, messages[:i], add_generation_prompt=True, where=where) if i else ""
    through = render_chat(tokenizer, messages[:i + 1], add_generation_prompt=False, where=where)
    _require_prefix(before, through, where)
    _require_prefix(through, text, where)
    return len(before), len(through)


def _end_targets_at_eos(ids: list[int], mask: list[bool], eos_id: int) -> list[bool]:
    """Within each turn (run of targets), tokens after EOS (the template's newline) are context only."""
    ended, out = False, []
    for token, target in zip(ids, mask):
        ended = ended and target
        out.append(target and not ended)
        ended = ended or (target and token == eos_id)
    return out


def _last_target_run(ids: list[int], mask: list[bool]) -> list[int]:
    """The ids of the last run of targets: the final assistant turn."""
    end = len(mask)
    while end > 0 and not mask[end - 1]:
        end -= 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return ids[start:end]


def _first_not_target(mask: list[bool]) -> list[bool]:
    return [False, *mask[1:]] if mask else mask


def encode_sft(examples: Sequence[SFTExample], tokenizer: Any, *, max_length: int | None = None,
               truncation: Truncation = "truncate", completion_only: bool = True,
               report: LoadReport | None = None) -> list[SFTTokens]:
    """Encode demonstrations, fitting each to `max_length` (counted in `report`)."""
    report = report if report is not None else LoadReport()
    encoded = []
    for example in examples:
        tokens = encode_sft_example(tokenizer, example, completion_only=completion_only)
        fitted = fit_sft(tokens, max_length, truncation, report)
        if fitted is not None:
            encoded.append(fitted)
    return encoded


def fit_sft(tokens: SFTTokens, max_length: int | None, truncation: Truncation,
            report: LoadReport) -> SFTTokens | None:
    """Keep the first `max_length` tokens, or drop; None when dropped (counted)."""
    _check_truncation(truncation)
    if max_length is None or len(tokens.input_ids) <= max_length:
        return tokens
    cut = replace(tokens, input_ids=tokens.input_ids[:max_length], loss_mask=tokens.loss_mask[:max_length])
    if truncation == "drop" or not any(cut.loss_mask):
        report.dropped += 1
        return None
    report.truncated += 1
    return cut


def _check_truncation(truncation: str) -> None:
    if truncation not in ("truncate", "drop"):
        raise ValueError(f"truncation: {truncation!r}; allowed: 'truncate', 'drop'")


# --- prompt + completions (preference, unpaired, listwise) --------------------------------------------

def encode_preference(examples: Sequence[PreferenceExample], tokenizer: Any, *, max_length: int | None = None,
                      truncation: Truncation = "truncate", report: LoadReport | None = None
                      ) -> list[PreferenceTokens]:
    """Encode pairs; the prompt is kept whole and completions are cut to fit (counted in `report`)."""
    fitted = _fit_each(examples, lambda e: [e.chosen, e.rejected], tokenizer, max_length, truncation, report)
    return [PreferenceTokens(prompt_ids, chosen, rejected, e.where) for e, prompt_ids, (chosen, rejected) in fitted]


def encode_unpaired(examples: Sequence[UnpairedExample], tokenizer: Any, *, max_length: int | None = None,
                    truncation: Truncation = "truncate", report: LoadReport | None = None
                    ) -> list[CompletionTokens]:
    """Encode labelled completions (one per example), fitted like preference pairs."""
    fitted = _fit_each(examples, lambda e: [e.completion], tokenizer, max_length, truncation, report)
    return [CompletionTokens(prompt_ids, ids, e.where, label=e.label) for e, prompt_ids, ids in fitted]


def encode_listwise(examples: Sequence[ListwiseExample], tokenizer: Any, *, max_length: int | None = None,
                    truncation: Truncation = "truncate", report: LoadReport | None = None
                    ) -> list[CompletionTokens]:
    """Encode scored completion lists, fitted like preference pairs."""
    fitted = _fit_each(examples, lambda e: e.completions, tokenizer, max_length, truncation, report)
    return [CompletionTokens(prompt_ids, ids, e.where, scores=e.scores) for e, prompt_ids, ids in fitted]


def _fit_each(examples: Sequence[Any], completions_of: Callable[[Any], Sequence[Content]], tokenizer: Any,
              max_length: int | None, truncation: Truncation, report: LoadReport | None
              ) -> Iterator[tuple[Any, list[int], list[list[int]]]]:
    """(example, prompt ids, fitted completion ids) for each example whose completions fit; the rest are
    counted in `report` by `fit_completions`."""
    report = report if report is not None else LoadReport()
    for example in examples:
        prompt_ids, completions = _encode_prompt_and_completions(
            tokenizer, example.prompt, completions_of(example), example.where)
        fitted = fit_completions(prompt_ids, completions, max_length, truncation, report)
        if fitted is not None:
            yield example, prompt_ids, fitted


def _encode_prompt_and_completions(tokenizer: Any, prompt: Content | None, completions: Sequence[Content],
                                   where: str) -> tuple[list[int], list[list[int]]]:
    prompt_ids = encode_prompt(tokenizer, prompt, where=where)
    return prompt_ids, [encode_completion(tokenizer, prompt, c, where=where) for c in completions]


def fit_completions(prompt_ids: list[int], completions: list[list[int]], max_length: int | None,
                    truncation: Truncation, report: LoadReport) -> list[list[int]] | None:
    """Cut each completion to `max_length - len(prompt_ids)`, or drop; None when dropped (counted)."""
    _check_truncation(truncation)
    room = None if max_length is None else max_length - len(prompt_ids)
    if room is None or all(len(c) <= room for c in completions):
        return completions
    if truncation == "drop" or room <= 0:
        report.dropped += 1
        return None
    report.truncated += 1
    return [c[:room] for c in completions]


# --- prompt-only --------------------------------------------------------------------------------------

def encode_prompts(examples: Sequence[PromptExample], tokenizer: Any, *, max_length: int | None = None,
                   truncation: Truncation = "truncate",
                   report: LoadReport | None = None) -> list[PromptTokens]:
    """Encode prompts for generation (conversations with the generation prompt); too long prompts keep
    their last `max_length` tokens or are dropped (counted in `report`)."""
    _check_truncation(truncation)
    report = report if report is not None else LoadReport()
    encoded = []
    for example in examples:
        ids = encode_prompt(tokenizer, example.prompt, where=example.where)
        if max_length is not None and len(ids) > max_length:
            if truncation == "drop":
                report.dropped += 1
                continue
            report.truncated += 1
            ids = ids[-max_length:]
        encoded.append(PromptTokens(ids, example.where, example.extra, example.prompt))
    return encoded
