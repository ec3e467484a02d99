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
  any template that renders a conversation's prefixes as prefixes of its rendering, and needs no
  `{% generation %}` markers, which most templates lack. A template that rewrites earlier turns (Qwen3 drops
  the reasoning of assistant turns before the last user turn) renders no such prefixes: an SFT conversation
  is then rendered per assistant turn, one sequence for each, `messages[:i + 1]` with turn i its only target,
  so that each turn is trained in the context the template gives it when the model answers there.
- EOS: appended to a text completion, and after the last assistant turn of a conversation when the
  template wrote no EOS inside it (ChatML templates whose EOS is `<|im_end|>` write it themselves).
- `loss_mask[t]` is True when token t is a target, i.e. predicted by the logits at t - 1. Position 0
  of every sequence is never a target (nothing predicts it), which also keeps packed documents apart.

Truncation (`max_length`, `truncation="truncate" | "drop"`, counted in `LoadReport`):
- SFT: keep the first `max_length` tokens (the right end is cut, as TRL does); an example left with no
  target token is dropped.
- preference / unpaired / listwise: the prompt is kept whole (or, with `max_prompt_length`, its last
  `max_prompt_length` tokens, as TRL's max_prompt_length and `encode_prompts` keep them) and each completion is
  cut to `max_length - len(prompt_ids)`; when the prompt leaves no room the example is dropped.
- prompt-only: keep the last `max_length` tokens (the start is cut, as TRL's `max_prompt_length`),
  so the generation prompt at the end survives.

A text far longer than `max_length` is cut before it is tokenised (`tokenize_within`): only a part long
enough to give `CUT_MARGIN_TOKENS` more tokens than can be kept is tokenised, so that one huge row costs
memory in proportion to `max_length`, not to its size. The kept tokens are those of the whole text (the
cut's end, a word split in two, lies in the margin past them), and the row is still counted as truncated
or dropped; `tests/data/test_encoding.py` holds both equal to tokenising the whole text.

A pair whose chosen and rejected ids are equal (as written, or once truncated) has no preference to learn:
its loss has a zero gradient. It is a bad row (`on_bad_row`: raised, or skipped and counted under
"identical pair"), as is a listwise row whose completions are all equal.
"""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from posttrain.data.compact import CompactExamples
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
OnBadRow = Literal["error", "skip"]

CUT_MARGIN_TOKENS = 64
"""Tokens past those kept that a cut text must still give, so that its cut end lies beyond every kept token."""
CHARS_PER_TOKEN_GUESS = 8
"""The first cut of a long text keeps this many characters per token wanted; each retry keeps 4 times more."""


@dataclass(frozen=True, slots=True)
class SFTTokens:
    """One SFT sequence: `input_ids` [T] and `loss_mask` [T] (True where the token is a target)."""

    input_ids: list[int]
    loss_mask: list[bool]
    where: str

    @property
    def num_targets(self) -> int:
        return sum(self.loss_mask)


@dataclass(frozen=True, slots=True)
class PreferenceTokens:
    """A pair: the model sees `prompt_ids + chosen_ids` and `prompt_ids + rejected_ids`."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    where: str


@dataclass(frozen=True, slots=True)
class CompletionTokens:
    """Prompt and completions scored as a whole (unpaired: one completion and its label; listwise:
    several completions and their scores)."""

    prompt_ids: list[int]
    completion_ids: list[list[int]]
    where: str
    label: bool | None = None
    scores: list[float] | None = None


@dataclass(frozen=True, slots=True)
class PromptTokens:
    """A prompt for generation, with the row's other columns (`answer`, ...) verbatim."""

    prompt_ids: list[int]
    where: str
    extra: dict[str, Any] = field(default_factory=dict)
    prompt: Content | None = None
    """The row's prompt as written (text, or a conversation): what reward functions receive, as TRL passes it."""


# --- rendering and tokenising -------------------------------------------------------------------------

def render_chat(tokenizer: Any, messages: Conversation, *, add_generation_prompt: bool, where: str,
                tools: list[dict[str, Any]] | None = None) -> str:
    """The chat template's text for `messages` (with the row's `tools` schemas). Raises DataError when the tokenizer
    has no template."""
    if not getattr(tokenizer, "chat_template", None):  # None, or an empty template that renders nothing
        raise DataError(f"{where}: the row is conversational but the tokenizer has no chat_template; "
                        "give the tokenizer one (tokenizer.chat_template = ...) or use text fields",
                        reason="no chat template")
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def tokenize_text(tokenizer: Any, text: str, *, add_special_tokens: bool, max_tokens: int | None = None,
                  from_end: bool = False) -> list[int]:
    """The ids of `text`; with `max_tokens`, of as much of its start (its end, `from_end`) as `tokenize_within` cuts."""
    encoding = tokenize_within(tokenizer, text, max_tokens=max_tokens, from_end=from_end,
                               add_special_tokens=add_special_tokens)
    return list(encoding["input_ids"])


def tokenize_within(tokenizer: Any, text: str, *, max_tokens: int | None, from_end: bool = False,
                    **options: Any) -> Any:
    """`tokenizer(text, **options)`, or, when a caller keeps only the first (`from_end`: last) `max_tokens` ids,
    `tokenizer(part, **options)` of the text's start (end) long enough to give more than `max_tokens +
    CUT_MARGIN_TOKENS` ids. The part grows 4 times at a time, from `CHARS_PER_TOKEN_GUESS` characters per token,
    up to the whole text; the ids past `max_tokens` of a part are not the text's and are only there to be cut.
    Character offsets (`return_offsets_mapping`) of a start are those of the whole text."""
    wanted = None if max_tokens is None else max(max_tokens, 0) + CUT_MARGIN_TOKENS
    chars = len(text) if wanted is None else CHARS_PER_TOKEN_GUESS * wanted
    while chars < len(text):
        encoding = tokenizer(text[-chars:] if from_end else text[:chars], **options)
        if len(encoding["input_ids"]) > wanted:
            return encoding
        chars *= 4
    return tokenizer(text, **options)


def encode_prompt(tokenizer: Any, prompt: Content | None, *, where: str, max_length: int | None = None,
                  from_end: bool = False, tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Prompt ids exactly as the generator receives them (with the row's `tools` schemas). None: the tokenizer's
    leading specials only.

    max_length: the caller keeps at most the first (`from_end`: last) `max_length` ids, so of a longer prompt
    only a part is tokenised (`tokenize_within`) and more than `max_length` ids are returned, to be cut.
    """
    if prompt is None:
        return tokenize_text(tokenizer, "", add_special_tokens=True)
    cut = {"max_tokens": max_length, "from_end": from_end}
    if isinstance(prompt, str):
        return tokenize_text(tokenizer, prompt, add_special_tokens=True, **cut)
    text = render_chat(tokenizer, prompt, add_generation_prompt=True, where=where, tools=tools)
    return tokenize_text(tokenizer, text, add_special_tokens=False, **cut)


def encode_completion(tokenizer: Any, prompt: Content | None, completion: Content, *, where: str,
                      max_length: int | None = None, tools: list[dict[str, Any]] | None = None) -> list[int]:
    """The ids that follow `encode_prompt(prompt)` for this completion, EOS included. max_length: the caller
    keeps at most the first `max_length` ids (as `encode_prompt`)."""
    if isinstance(completion, str):
        ids = tokenize_text(tokenizer, completion, add_special_tokens=False, max_tokens=max_length)
        return _with_eos(ids, tokenizer.eos_token_id)
    prompt_text = render_chat(tokenizer, prompt, add_generation_prompt=True, where=where, tools=tools)
    whole_text = render_chat(tokenizer, [*prompt, *completion], add_generation_prompt=False, where=where, tools=tools)
    _require_prefix(prompt_text, whole_text, where)
    ids = tokenize_text(tokenizer, whole_text[len(prompt_text):], add_special_tokens=False, max_tokens=max_length)
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

def encode_sft_example(tokenizer: Any, example: SFTExample, *, completion_only: bool = True,
                       max_length: int | None = None) -> SFTTokens:
    """Token ids and loss mask of one demonstration (rules in the module docstring), not truncated.

    max_length: the caller keeps at most the first `max_length` tokens, so of a longer example only a part is
    tokenised and more than `max_length` tokens are returned, to be cut (`tokenize_within`).
    """
    if isinstance(example.completion, str) and example.prompt is None:
        ids = tokenize_text(tokenizer, example.completion, add_special_tokens=True, max_tokens=max_length)
        ids = _with_eos(ids, tokenizer.eos_token_id)
        return SFTTokens(ids, _first_not_target([True] * len(ids)), example.where)
    if isinstance(example.completion, str):
        prompt_ids = encode_prompt(tokenizer, example.prompt, where=example.where, max_length=max_length,
                                   tools=example.tools)
        room = None if max_length is None else max_length - len(prompt_ids)
        completion_ids = encode_completion(tokenizer, example.prompt, example.completion, where=example.where,
                                           max_length=room, tools=example.tools)
        mask = [not completion_only] * len(prompt_ids) + [True] * len(completion_ids)
        return SFTTokens(prompt_ids + completion_ids, _first_not_target(mask), example.where)
    prompt = example.prompt or []
    ids, mask = encode_conversation(tokenizer, [*prompt, *example.completion], first_target_turn=len(prompt),
                                    where=example.where, max_length=max_length, tools=example.tools)
    if not completion_only:
        mask = [True] * len(ids)
    return SFTTokens(ids, _first_not_target(mask), example.where)


def encode_conversation(tokenizer: Any, messages: Conversation, *, first_target_turn: int = 0,
                        where: str, max_length: int | None = None,
                        tools: list[dict[str, Any]] | None = None) -> tuple[list[int], list[bool]]:
    """Ids of the rendered conversation [T] and a mask [T], True on the tokens of every assistant turn
    at index >= first_target_turn (its content and end-of-turn marker), found by rendering prefixes.
    max_length: the caller keeps at most the first `max_length` tokens (as `encode_sft_example`); the turns
    that start past the part tokenised are not rendered alone."""
    text = render_chat(tokenizer, messages, add_generation_prompt=False, where=where, tools=tools)
    encoding = tokenize_within(tokenizer, text, max_tokens=max_length, add_special_tokens=False,
                               return_offsets_mapping=True)
    tokenised = encoding["offset_mapping"][-1][1] if encoding["offset_mapping"] else 0  # characters
    spans = []
    for i in range(first_target_turn, len(messages)):
        if messages[i]["role"] == "assistant":
            spans.append(_assistant_span(tokenizer, messages, i, text, where, tools))
            if spans[-1][0] >= tokenised:
                break  # a cut text: this turn and the later ones start past its last token
    ids = list(encoding["input_ids"])
    mask = [any(start <= begin < end for start, end in spans) for begin, _ in encoding["offset_mapping"]]
    mask = _end_targets_at_eos(ids, mask, tokenizer.eos_token_id)
    if tokenizer.eos_token_id not in _last_target_run(ids, mask):
        ids, mask = [*ids, tokenizer.eos_token_id], [*mask, True]
    return ids, mask


def _assistant_span(tokenizer: Any, messages: Conversation, i: int, text: str, where: str,
                    tools: list[dict[str, Any]] | None = None) -> tuple[int, int]:
    before = render_chat(tokenizer, messages[:i], add_generation_prompt=True, where=where, tools=tools) if i else ""
    through = render_chat(tokenizer, messages[:i + 1], add_generation_prompt=False, where=where, tools=tools)
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
               report: LoadReport | None = None) -> CompactExamples:
    """Encode demonstrations, fitting each to `max_length` (counted in `report`); a conversation whose template
    rewrites earlier turns gives one sequence per assistant turn (`encode_sft_turns`). The `SFTTokens` are kept as
    bytes (`CompactExamples`): lists of ids took 10 times a short row's file size (bench/RESULTS.md, "Loading rows")."""
    report = report if report is not None else LoadReport()
    encoded = CompactExamples()
    for example in examples:
        try:
            sequences = [encode_sft_example(tokenizer, example, completion_only=completion_only,
                                            max_length=max_length)]  # fmt: skip
        except DataError as error:
            if error.reason != "chat template" or isinstance(example.completion, str):
                raise
            sequences = encode_sft_turns(tokenizer, example, completion_only=completion_only, max_length=max_length)
        for tokens in sequences:
            fitted = fit_sft(tokens, max_length, truncation, report)
            if fitted is not None:
                encoded.append(fitted)
    return encoded


def encode_sft_turns(tokenizer: Any, example: SFTExample, *, completion_only: bool = True,
                     max_length: int | None = None) -> list[SFTTokens]:
    """One sequence per assistant turn i of a conversational demonstration: `messages[:i + 1]` rendered, turn i
    its only target (for templates that rewrite earlier turns; module docstring)."""
    messages = [*(example.prompt or []), *example.completion]
    out = []
    for i in range(len(example.prompt or []), len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        where = f"{example.where} (assistant turn {i + 1})"
        ids, mask = encode_conversation(tokenizer, messages[:i + 1], first_target_turn=i, where=where,
                                        max_length=max_length, tools=example.tools)  # fmt: skip
        out.append(SFTTokens(ids, _first_not_target(mask if completion_only else [True] * len(ids)), where))
    return out


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
                      truncation: Truncation = "truncate", on_bad_row: OnBadRow = "error",
                      report: LoadReport | None = None, max_prompt_length: int | None = None) -> list[PreferenceTokens]:
    """Encode pairs; the prompt is kept whole and completions are cut to fit (counted in `report`). A pair whose
    chosen and rejected ids are equal is raised (`on_bad_row="error"`) or skipped and counted."""
    report = report if report is not None else LoadReport()
    fitted = _fit_each(examples, lambda e: [e.chosen, e.rejected], tokenizer, max_length, truncation, report,
                       max_prompt_length)
    return [PreferenceTokens(prompt_ids, chosen, rejected, e.where)
            for e, prompt_ids, (chosen, rejected), cut in fitted
            if _differ(chosen, rejected, what="'chosen' and 'rejected'", cut=cut, where=e.where,
                       on_bad_row=on_bad_row, report=report)]


def encode_unpaired(examples: Sequence[UnpairedExample], tokenizer: Any, *, max_length: int | None = None,
                    truncation: Truncation = "truncate", on_bad_row: OnBadRow = "error",
                    report: LoadReport | None = None, max_prompt_length: int | None = None) -> list[CompletionTokens]:
    """Encode labelled completions (one per example), fitted like preference pairs. `on_bad_row` is taken for
    the same arguments as the other encoders; a row with one completion has no pair to compare."""
    fitted = _fit_each(examples, lambda e: [e.completion], tokenizer, max_length, truncation, report, max_prompt_length)
    return [CompletionTokens(prompt_ids, ids, e.where, label=e.label) for e, prompt_ids, ids, _ in fitted]


def encode_listwise(examples: Sequence[ListwiseExample], tokenizer: Any, *, max_length: int | None = None,
                    truncation: Truncation = "truncate", on_bad_row: OnBadRow = "error",
                    report: LoadReport | None = None, max_prompt_length: int | None = None) -> list[CompletionTokens]:
    """Encode scored completion lists, fitted like preference pairs; a list whose completions' ids are all equal
    is raised (`on_bad_row="error"`) or skipped and counted."""
    report = report if report is not None else LoadReport()
    fitted = _fit_each(examples, lambda e: e.completions, tokenizer, max_length, truncation, report, max_prompt_length)
    return [CompletionTokens(prompt_ids, ids, e.where, scores=e.scores) for e, prompt_ids, ids, cut in fitted
            if _differ(*ids, what="all completions", cut=cut, where=e.where, on_bad_row=on_bad_row, report=report)]


def _differ(*completions: list[int], what: str, cut: bool, where: str, on_bad_row: OnBadRow,
            report: LoadReport) -> bool:
    """Whether the completions' ids are not all equal; when they are, raise or count the row as "identical pair"."""
    if any(ids != completions[0] for ids in completions[1:]):
        return True
    how = (f" once truncated to max_length ({len(completions[0])} tokens each; a larger max_length keeps them apart)"
           if cut else "")
    error = DataError(f"{where}: {what} are the same tokens{how}; equal completions have no preference to learn "
                      "(their loss has a zero gradient)", reason="identical pair")
    if on_bad_row == "error":
        raise error
    report.skipped[error.reason] += 1
    return False


def _fit_each(examples: Sequence[Any], completions_of: Callable[[Any], Sequence[Content]], tokenizer: Any,
              max_length: int | None, truncation: Truncation, report: LoadReport | None,
              max_prompt_length: int | None = None) -> Iterator[tuple[Any, list[int], list[list[int]], bool]]:
    """(example, prompt ids, fitted completion ids, whether they were cut) for each example whose completions
    fit; the rest are counted in `report` by `fit_completions`. A prompt longer than `max_prompt_length` keeps its
    last tokens (counted as truncated, once per example)."""
    report = report if report is not None else LoadReport()
    for example in examples:
        prompt_ids, completions = _encode_prompt_and_completions(
            tokenizer, example.prompt, completions_of(example), example.where, max_length, max_prompt_length)
        prompt_cut = max_prompt_length is not None and len(prompt_ids) > max_prompt_length
        if prompt_cut:
            prompt_ids = prompt_ids[-max_prompt_length:]
        fitted = fit_completions(prompt_ids, completions, max_length, truncation, report)
        if fitted is not None:
            if prompt_cut and fitted is completions:
                report.truncated += 1
            yield example, prompt_ids, fitted, fitted is not completions


def _encode_prompt_and_completions(tokenizer: Any, prompt: Content | None, completions: Sequence[Content],
                                   where: str, max_length: int | None, max_prompt_length: int | None = None
                                   ) -> tuple[list[int], list[list[int]]]:
    if max_prompt_length is not None:
        prompt_ids = encode_prompt(tokenizer, prompt, where=where, max_length=max_prompt_length, from_end=True)
        kept = min(len(prompt_ids), max_prompt_length)
    else:
        prompt_ids = encode_prompt(tokenizer, prompt, where=where, max_length=max_length)
        kept = len(prompt_ids)
    room = None if max_length is None else max_length - kept
    return prompt_ids, [encode_completion(tokenizer, prompt, c, where=where, max_length=room) for c in completions]


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


# --- the model's positions ---------------------------------------------------------------------------

def check_positions(model: Any, lengths: dict[str, int]) -> None:
    """Refuse a run whose longest sequence is longer than the model has positions for: a position past them was
    never trained, and a RoPE model runs on there silently. `lengths` maps config keys to the tokens they allow
    in one sequence (`{"data.max_length": 512}`; `{"rl.max_prompt_length": 256, "rl.sampling.max_new_tokens":
    64}`, summed). The model's positions are `max_position_embeddings` (or GPT-2's `n_positions`) of its config,
    times the RoPE scaling factor when the config extends them (linear, dynamic, YaRN, LongRoPE) without naming
    `original_max_position_embeddings`. A model whose config names none is not checked. Raises DataError."""
    positions = model_positions(getattr(model, "config", model))
    total = sum(lengths.values())
    if positions is None or total <= positions:
        return
    keys = " + ".join(f"{key}={n}" for key, n in lengths.items()) + (f" = {total}" if len(lengths) > 1 else "")
    fix = (f"set {next(iter(lengths))} to at most {positions}" if len(lengths) == 1
           else f"lower {' or '.join(lengths)} so that they sum to at most {positions}")
    raise DataError(f"{keys} tokens is more than the model's {positions} positions (max_position_embeddings in its "
                    f"config); a position past them was never trained: {fix}", reason="longer than the model")


def model_positions(config: Any) -> int | None:
    """The longest sequence a model config was trained for (`check_positions`), None when it names none."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    positions = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
    rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
    if not isinstance(positions, int):
        return None
    extended = rope.get("rope_type", rope.get("type", "default")) not in ("default", None)
    if extended and "original_max_position_embeddings" not in rope:
        positions = int(positions * float(rope.get("factor") or 1.0))
    return positions


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
        ids = encode_prompt(tokenizer, example.prompt, where=example.where, max_length=max_length, from_end=True)
        if max_length is not None and len(ids) > max_length:
            if truncation == "drop":
                report.dropped += 1
                continue
            report.truncated += 1
            ids = ids[-max_length:]
        encoded.append(PromptTokens(ids, example.where, example.extra, example.prompt))
    return encoded
