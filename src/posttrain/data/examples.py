"""Validate rows into typed examples, one type per kind of data a trainer consumes.

Kinds and the fields they read (Hugging Face / TRL names, so TRL data works unchanged):

| kind         | fields                                                                 |
|--------------|------------------------------------------------------------------------|
| `sft`        | `prompt` + `completion`, or `messages`, or `text` (plain LM)           |
| `preference` | `chosen` + `rejected`, optional `prompt`                               |
| `unpaired`   | `prompt` + `completion` + `label` (bool)                               |
| `listwise`   | `prompt` + `completions` (>= 2) + `scores` (numbers, one each)         |
| `stepwise`   | `prompt` + `completions` (the steps, >= 1) + `labels` (bool, one each) |
| `prompt`     | `prompt`; every other column is kept verbatim in `extra` (`answer`...) |

A field is text (a non-empty string) or conversational (a list of `{"role", "content"}` messages);
the fields of one row are all text or all conversational.

Conversation rules (checked on every conversational field; `Conversation` below):
- roles are `system`, `user`, `assistant`, `tool`; `content` is a string, non-empty except for an
  assistant message that carries `tool_calls`; other keys (`tool_calls`, `name`, ...) are kept;
- `system` only as the first message; the first other message is `user`;
- no two `user` turns and no two `assistant` turns in a row; `tool` only after `assistant` or `tool`;
- a whole conversation (`messages`, or `prompt` + `completion`) ends with an `assistant` turn;
- a prompt ends with a `user` or `tool` turn (the model speaks next);
- an SFT completion starts and ends with `assistant` (it may hold tool turns in between); a
  preference, unpaired or listwise completion is exactly one `assistant` message.

Every string of a row, nested ones and keys included, must be Unicode text: a lone surrogate (a JSON `\ud800`
escape without its other half) is a bad row, named with its field, since no tokenizer can encode it.

Preference rows without `prompt` ("implicit prompt", as TRL's `extract_prompt`): for conversations the longest
shared prefix of messages becomes the prompt and the rest of each must be one assistant message; for text the
longest shared prefix of characters, less a space it ends with (which starts both completions: "The sky is" +
" blue." / " green."), so that length-normalised losses (SimPO, ORPO) see the completions only. Text pairs that
share no character have no prompt (prompt None: the tokenizer's leading specials only).

`unpaired` rows may be preference pairs (`chosen` + `rejected`, with or without `prompt`, as above), as TRL's
KTO trainer takes them (`unpair_preference_dataset`): each pair gives two labelled completions, the chosen one
desirable and the rejected one undesirable (where "(chosen)" / "(rejected)").
"""

import itertools
import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from posttrain.data.compact import CompactExamples
from posttrain.data.errors import DataError, show_names, show_value
from posttrain.data.readers import Row, gc_paused, iter_rows
from posttrain.data.report import LoadReport

Message = dict[str, Any]
Conversation = list[Message]
Content = str | Conversation
Kind = Literal["sft", "preference", "unpaired", "listwise", "stepwise", "prompt"]
OnBadRow = Literal["error", "skip"]

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True, slots=True)
class SFTExample:
    """A demonstration. `text` rows: prompt None, completion the text (every token trained).
    `messages` rows: prompt None, completion the conversation (every assistant turn trained)."""

    prompt: Content | None
    completion: Content
    where: str
    tools: list[dict[str, Any]] | None = None
    """The row's `tools` column (JSON schemas, TRL's format), given to the chat template as `tools=`."""


@dataclass(frozen=True, slots=True)
class PreferenceExample:
    """A pair: `chosen` preferred over `rejected` after `prompt` (None: no prompt, text only)."""

    prompt: Content | None
    chosen: Content
    rejected: Content
    where: str


@dataclass(frozen=True, slots=True)
class UnpairedExample:
    """One completion labelled desirable (True) or undesirable (False), as KTO consumes (prompt None: one side of
    an unpaired text pair that shared no prefix)."""

    prompt: Content | None
    completion: Content
    label: bool
    where: str


@dataclass(frozen=True, slots=True)
class ListwiseExample:
    """Several completions of one prompt with a score each (higher is better)."""

    prompt: Content
    completions: list[Content]
    scores: list[float]
    where: str


@dataclass(frozen=True, slots=True)
class StepwiseExample:
    """A reasoning trace split into steps, each labelled right (True) or wrong, as a process reward model learns
    from (TRL's stepwise supervision format). Text only."""

    prompt: str
    steps: list[str]
    labels: list[bool]
    where: str


@dataclass(frozen=True, slots=True)
class PromptExample:
    """A prompt for generation (RL, evaluation), with the row's other columns kept verbatim."""

    prompt: Content
    where: str
    extra: dict[str, Any] = field(default_factory=dict)


Example = SFTExample | PreferenceExample | UnpairedExample | ListwiseExample | StepwiseExample | PromptExample


def load_examples(path: str | Path, kind: Kind, *, split: str | None = None,
                  on_bad_row: OnBadRow = "error") -> tuple[CompactExamples, LoadReport]:
    """Read a dataset and validate every row as `kind`. Returns the examples and the report.

    Rows are validated as they are read, so that only the examples stay in memory, not the file's rows too, and
    the examples are kept as bytes (`validate_rows`).
    """
    report = LoadReport(source=str(path))
    rows = iter_rows(path, split=split, on_bad_row=on_bad_row, report=report)
    with gc_paused():
        return validate_rows(rows, kind, on_bad_row=on_bad_row, report=report), report


def validate_rows(rows: Iterable[Row], kind: Kind, *, on_bad_row: OnBadRow = "error",
                  report: LoadReport | None = None) -> CompactExamples:
    """Turn rows into examples of `kind`, in a read-only sequence that keeps them as bytes (`CompactExamples`: about
    the size of the rows' text, where dataclasses of Python strings took 7 times a short row's; bench/RESULTS.md,
    "Loading rows"). Each example it gives is equal to the one validated.

    on_bad_row: "error" raises the first DataError (it names file, row and field); "skip" leaves the
    row out and counts it in `report.skipped` under the error's reason.
    """
    if kind not in VALIDATORS:
        raise ValueError(f"kind: {kind!r} is not a data kind; kinds: {', '.join(VALIDATORS)}")
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row: {on_bad_row!r}; allowed: 'error', 'skip'")
    validate = VALIDATORS[kind]
    report = report if report is not None else LoadReport()
    examples = CompactExamples()
    for row in rows:
        try:
            check_unicode(row)
            example = validate(row)
            if isinstance(example, tuple):
                for one in example:
                    examples.append(one)
            else:
                examples.append(example)
        except DataError as error:
            if on_bad_row == "error":
                raise
            report.skipped[error.reason] += 1
    return examples


# --- one validator per kind -------------------------------------------------------------------------

def validate_sft_row(row: Row) -> SFTExample:
    fields = row.fields
    if "prompt" in fields and "completion" in fields:
        prompt, completion = _content_pair(row, "prompt", "completion", single_turn=False)
        return SFTExample(prompt, completion, row.where, _tools(row))
    if "messages" in fields:
        messages = _conversation(row, "messages")
        _check_turns(messages, row.where, "messages", first="user", last=("assistant",))
        return SFTExample(None, messages, row.where, _tools(row))
    if "text" in fields:
        return SFTExample(None, _text(row, "text"), row.where)
    raise _missing_fields(row, "'prompt' + 'completion', or 'messages', or 'text'")


def _tools(row: Row) -> list[dict[str, Any]] | None:
    """The `tools` column: a list of function schemas (objects), or that list as a JSON string; None when absent."""
    tools = row.fields.get("tools")
    if tools is None:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise DataError(f"{row.where}: field 'tools': not JSON ({err.msg})", reason="bad tools") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{row.where}: field 'tools': expected a list of function schemas (objects), found "
                        f"{type(tools).__name__}", reason="bad tools")  # fmt: skip
    return tools


def validate_preference_row(row: Row) -> PreferenceExample:
    _require(row, ("chosen", "rejected"), "'chosen' + 'rejected' (and optionally 'prompt')")
    if "prompt" in row.fields:
        prompt, chosen = _content_pair(row, "prompt", "chosen", single_turn=True)
        _, rejected = _content_pair(row, "prompt", "rejected", single_turn=True)
        return PreferenceExample(prompt, chosen, rejected, row.where)
    if isinstance(row.fields["chosen"], str):
        rejected = _text_matching(row, "rejected", "chosen")
        prompt, chosen, rejected = split_text_prompt(_text(row, "chosen"), rejected)
        for name, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise DataError(f"{row.where}: field {name!r}: nothing of it follows the prompt it shares with the "
                                f"other ({show_value(prompt[-40:])}); give 'prompt', or completions that differ",
                                reason="empty text")  # fmt: skip
        return PreferenceExample(prompt or None, chosen, rejected, row.where)
    return _split_implicit_prompt(row)


def split_text_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen completion, rejected completion) of an implicit-prompt text pair, as TRL's `extract_prompt`:
    the prompt is the text up to the first character where the two differ, less a space it ends with (the space
    starts both completions); where the shorter one is a prefix of the other, its last character starts the
    completions."""
    shortest = min(len(chosen), len(rejected))
    cut = next((i for i in range(shortest) if chosen[i] != rejected[i]), None)
    if cut is None:
        cut = shortest - 1
    elif cut > 0 and chosen[cut - 1] == " ":
        cut -= 1
    cut = max(cut, 0)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def validate_unpaired_row(row: Row) -> UnpairedExample | tuple[UnpairedExample, UnpairedExample]:
    if "chosen" in row.fields and "rejected" in row.fields and "completion" not in row.fields:
        pair = validate_preference_row(row)  # a preference pair, unpaired as TRL's KTO trainer does
        return (UnpairedExample(pair.prompt, pair.chosen, True, f"{row.where} (chosen)"),
                UnpairedExample(pair.prompt, pair.rejected, False, f"{row.where} (rejected)"))  # fmt: skip
    _require(row, ("prompt", "completion", "label"), "'prompt' + 'completion' + 'label' (or a pair: 'chosen' + "
             "'rejected')")  # fmt: skip
    prompt, completion = _content_pair(row, "prompt", "completion", single_turn=True)
    label = row.fields["label"]
    if not isinstance(label, bool):
        raise DataError(f"{row.where}: field 'label': expected true or false, found {show_value(label)}",
                        reason="bad label")
    return UnpairedExample(prompt, completion, label, row.where)


def validate_listwise_row(row: Row) -> ListwiseExample:
    _require(row, ("prompt", "completions", "scores"), "'prompt' + 'completions' + 'scores'")
    completions, scores = row.fields["completions"], row.fields["scores"]
    if not isinstance(completions, list) or len(completions) < 2:
        raise DataError(f"{row.where}: field 'completions': expected a list of at least 2 completions, "
                        f"found {_describe(completions)}", reason="wrong type")
    _check_scores(scores, len(completions), row.where)
    prompt = None
    checked = []
    for i, completion in enumerate(completions):
        pair_row = Row({"prompt": row.fields["prompt"], f"completions[{i}]": completion}, row.where)
        prompt, checked_completion = _content_pair(pair_row, "prompt", f"completions[{i}]", single_turn=True)
        checked.append(checked_completion)
    return ListwiseExample(prompt, checked, [float(s) for s in scores], row.where)


def validate_stepwise_row(row: Row) -> StepwiseExample:
    _require(row, ("prompt", "completions", "labels"), "'prompt' + 'completions' (the steps) + 'labels'")
    if not isinstance(row.fields["prompt"], str):
        raise DataError(f"{row.where}: field 'prompt': stepwise rows are text; found {_describe(row.fields['prompt'])}",
                        reason="wrong type")  # fmt: skip
    steps, labels = row.fields["completions"], row.fields["labels"]
    if not isinstance(steps, list) or not steps:
        raise DataError(f"{row.where}: field 'completions': expected a non-empty list of steps (text), found "
                        f"{_describe(steps)}", reason="wrong type")  # fmt: skip
    for i, step in enumerate(steps):
        if not isinstance(step, str) or not step.strip():
            raise DataError(f"{row.where}: field 'completions[{i}]': expected a step's text, found {_describe(step)}",
                            reason="wrong type")  # fmt: skip
    if not isinstance(labels, list) or len(labels) != len(steps):
        raise DataError(f"{row.where}: field 'labels': expected a list of {len(steps)} labels (one per step), found "
                        f"{_describe(labels)}", reason="bad label")  # fmt: skip
    for i, label in enumerate(labels):
        if not isinstance(label, bool):
            raise DataError(f"{row.where}: field 'labels[{i}]': expected true or false, found {show_value(label)}",
                            reason="bad label")  # fmt: skip
    return StepwiseExample(_text(row, "prompt"), list(steps), list(labels), row.where)


def validate_prompt_row(row: Row) -> PromptExample:
    _require(row, ("prompt",), "'prompt' (other columns are kept as they are)")
    if isinstance(row.fields["prompt"], str):
        prompt: Content = _text(row, "prompt")
    else:
        prompt = _conversation(row, "prompt")
        _check_turns(prompt, row.where, "prompt", first="user", last=("user", "tool"))
    extra = {name: value for name, value in row.fields.items() if name != "prompt"}
    return PromptExample(prompt, row.where, extra)


VALIDATORS: dict[str, Callable[[Row], Example]] = {
    "sft": validate_sft_row,
    "preference": validate_preference_row,
    "unpaired": validate_unpaired_row,
    "listwise": validate_listwise_row,
    "stepwise": validate_stepwise_row,
    "prompt": validate_prompt_row,
}


# --- fields -------------------------------------------------------------------------------------------

def _require(row: Row, names: tuple[str, ...], expected: str) -> None:
    if not all(name in row.fields for name in names):
        raise _missing_fields(row, expected)


def _missing_fields(row: Row, expected: str) -> DataError:
    return DataError(f"{row.where}: fields found: {show_names(row.fields)}; expected {expected}",
                     reason="missing field")


def _text(row: Row, name: str) -> str:
    value = row.fields[name]
    if not isinstance(value, str):
        raise DataError(f"{row.where}: field {name!r}: expected text or a list of messages, "
                        f"found {_describe(value)}", reason="wrong type")
    if not value.strip():
        raise DataError(f"{row.where}: field {name!r}: empty text", reason="empty text")
    return value


def _text_matching(row: Row, name: str, other: str) -> str:
    if not isinstance(row.fields[name], str):
        raise _mixed_forms(row, other, name)
    return _text(row, name)


def _mixed_forms(row: Row, text_field: str, other: str) -> DataError:
    return DataError(f"{row.where}: field {other!r}: {text_field!r} is "
                     f"{'text' if isinstance(row.fields[text_field], str) else 'a conversation'} but "
                     f"{other!r} is {_describe(row.fields[other])}; both must be text or both conversations",
                     reason="mixed forms")


def _content_pair(row: Row, prompt_name: str, completion_name: str, *,
                  single_turn: bool) -> tuple[Content, Content]:
    """A prompt and its completion, both text or both conversations that together obey the turn rules."""
    if isinstance(row.fields[prompt_name], str):
        return _text(row, prompt_name), _text_matching(row, completion_name, prompt_name)
    prompt = _conversation(row, prompt_name)
    if isinstance(row.fields[completion_name], str) or not isinstance(row.fields[completion_name], list):
        raise _mixed_forms(row, prompt_name, completion_name)
    completion = _conversation(row, completion_name)
    _check_turns(prompt, row.where, prompt_name, first="user", last=("user", "tool"))
    _check_completion(completion, row.where, completion_name, single_turn=single_turn)
    _check_turns(prompt + completion, row.where, f"{prompt_name} + {completion_name}", first="user",
                 last=("assistant",))
    return prompt, completion


def _check_completion(completion: Conversation, where: str, name: str, *, single_turn: bool) -> None:
    if single_turn and (len(completion) != 1 or completion[0]["role"] != "assistant"):
        roles = [m["role"] for m in completion]
        raise DataError(f"{where}: field {name!r}: expected exactly one assistant message, "
                        f"found roles {show_value(roles, limit=200)}", reason="turn order")
    _check_turns(completion, where, name, first="assistant", last=("assistant",))


def _split_implicit_prompt(row: Row) -> PreferenceExample:
    chosen = _conversation(row, "chosen")
    if not isinstance(row.fields["rejected"], list):
        raise _mixed_forms(row, "chosen", "rejected")
    rejected = _conversation(row, "rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    prompt = chosen[:shared]
    if not prompt:
        raise DataError(f"{row.where}: fields 'chosen' and 'rejected' share no leading messages and there is "
                        "no 'prompt' field; give 'prompt', or make both conversations start with it",
                        reason="turn order")
    split_row = Row({"prompt": prompt, "chosen": chosen[shared:], "rejected": rejected[shared:]}, row.where)
    _, chosen_completion = _content_pair(split_row, "prompt", "chosen", single_turn=True)
    _, rejected_completion = _content_pair(split_row, "prompt", "rejected", single_turn=True)
    return PreferenceExample(prompt, chosen_completion, rejected_completion, row.where)


def _check_scores(scores: Any, count: int, where: str) -> None:
    if not isinstance(scores, list) or len(scores) != count:
        raise DataError(f"{where}: field 'scores': expected a list of {count} numbers (one per completion), "
                        f"found {_describe(scores)}", reason="bad scores")
    for i, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
            raise DataError(f"{where}: field 'scores[{i}]': expected a finite number, found {show_value(score)}",
                            reason="bad scores")


# --- conversations ------------------------------------------------------------------------------------

def _conversation(row: Row, name: str) -> Conversation:
    value = row.fields[name]
    if not isinstance(value, list) or not value:
        raise DataError(f"{row.where}: field {name!r}: expected text or a non-empty list of messages, "
                        f"found {_describe(value)}", reason="wrong type")
    for i, message in enumerate(value):
        _check_message(message, row.where, f"{name}[{i}]")
    return value


def _check_message(message: Any, where: str, name: str) -> None:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise DataError(f"{where}: field {name!r}: expected a message {{'role': ..., 'content': ...}}, "
                        f"found {_describe(message)}", reason="wrong type")
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise DataError(f"{where}: field {name!r}: unknown role {show_value(role)}; allowed: {', '.join(ROLES)}",
                        reason="unknown role")
    if not isinstance(content, str):
        raise DataError(f"{where}: field {name}.content: expected a string, found {_describe(content)}",
                        reason="wrong type")
    if not content.strip() and not (role == "assistant" and message.get("tool_calls")):
        raise DataError(f"{where}: field {name}.content: empty text", reason="empty text")


def _check_turns(messages: Conversation, where: str, name: str, *, first: str, last: tuple[str, ...]) -> None:
    """The order rules of the module docstring, for one conversation (or one part of one)."""
    roles = [m["role"] for m in messages]
    if "system" in roles[1:]:
        raise _turn_error(where, name, roles, "a system message may only come first")
    spoken = roles[1:] if roles[0] == "system" and first == "user" else roles
    if not spoken or spoken[0] != first:
        raise _turn_error(where, name, roles, f"the first turn must be {first}")
    for before, after in itertools.pairwise(spoken):
        if before == after and before in ("user", "assistant"):
            raise _turn_error(where, name, roles, f"two {before} turns in a row")
        if after == "tool" and before not in ("assistant", "tool"):
            raise _turn_error(where, name, roles, "a tool turn must follow an assistant or tool turn")
    if spoken[-1] not in last:
        raise _turn_error(where, name, roles, f"it must end with {' or '.join(last)}")


def _turn_error(where: str, name: str, roles: list[str], rule: str) -> DataError:
    return DataError(f"{where}: field {name!r}: turns {show_value(roles, limit=200)}: {rule}", reason="turn order")


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {show_value(value)}"


# --- Unicode ------------------------------------------------------------------------------------------

SURROGATE = re.compile("[\ud800-\udfff]")


def check_unicode(row: Row) -> None:
    """Raise DataError naming the first string of the row (a field, a nested value or a key) that holds a lone
    surrogate. Python strings may hold them (JSON's `\\ud800` escape decodes to one); UTF-8, and so every
    tokenizer, cannot encode them."""
    try:  # most rows: text fields of ASCII only, checked in one pass of C
        if "".join(row.fields.values()).isascii() and "".join(row.fields).isascii():
            return
    except TypeError:  # a value that is not text (a conversation, a label): walked below
        pass
    if not _holds_surrogate(row.fields):
        return
    stack: list[tuple[Any, str, str]] = [(row.fields, "", "")]
    while stack:
        value, name, shown = stack.pop()  # shown: how a message names the string
        if isinstance(value, str) and (found := SURROGATE.search(value)):
            raise DataError(f"{row.where}: {shown}: lone surrogate U+{ord(found.group()):04X} at character "
                            f"{found.start() + 1}, which is not Unicode text (half of a UTF-16 pair, e.g. a JSON "
                            "\\ud800 escape without its other half); write the whole character or remove it",
                            reason="invalid unicode")
        if isinstance(value, dict):
            where = f" in field {name!r}" if name else ""
            stack += [(key, name, f"the key {show_value(key)}{where}") for key in value]
            for key, item in value.items():
                path = f"{name}.{key}" if name else str(key)
                stack.append((item, path, f"field {path!r}"))
        elif isinstance(value, list):
            stack += [(item, f"{name}[{i}]", f"field '{name}[{i}]'") for i, item in enumerate(value)]


def _holds_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack += item
            stack += item.values()
        elif isinstance(item, list):
            stack += item
    return False
