"""Property-based checks (hypothesis) from rows to tensors: random rows (empty and whitespace strings,
unicode, long text, wrong types, unknown roles, turns in any order) are validated without any error but
the documented DataError, every row is kept or counted, and what is kept encodes, collates and packs
within max_length with consistent masks."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posttrain.data import (
    DataError,
    LoadReport,
    Row,
    collate_packed,
    collate_preference,
    collate_sft,
    encode_preference,
    encode_sft,
    pack_by_length,
    validate_rows,
)

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
KINDS = ("sft", "preference", "unpaired", "listwise", "prompt")

TEXT = st.one_of(
    st.text(max_size=40),  # any unicode, "" and whitespace included
    st.sampled_from(["", " ", "\n\t", "2+2=", " 4", "héllo wörld ✓", "日本語のテキスト", "🙂🙃", "a\x00b"]),
    st.text(alphabet="ab 1+", min_size=300, max_size=1200),  # long rows
)
ROLE = st.sampled_from(["system", "user", "assistant", "tool", "bot", ""])
MESSAGE = st.fixed_dictionaries({"role": ROLE, "content": st.one_of(TEXT, st.integers(), st.none())})
TURNS = st.lists(MESSAGE, max_size=5)
WELL_FORMED_CHAT = st.builds(
    lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
    TEXT,
    TEXT,
)
VALUE = st.one_of(TEXT, TURNS, WELL_FORMED_CHAT, st.integers(), st.none(), st.booleans(), st.lists(TEXT, max_size=3))
FIELDS = ["prompt", "completion", "messages", "text", "chosen", "rejected", "label", "completions", "scores"]
RANDOM_ROW = st.dictionaries(st.sampled_from([*FIELDS, "answer", "junk"]), VALUE, max_size=4)
SFT_ROW = st.one_of(
    st.fixed_dictionaries({"prompt": TEXT, "completion": TEXT}),
    st.fixed_dictionaries({"messages": st.one_of(WELL_FORMED_CHAT, TURNS)}),
    st.fixed_dictionaries({"text": TEXT}),
)
PAIR_ROW = st.fixed_dictionaries({"prompt": TEXT, "chosen": TEXT, "rejected": TEXT})
ROWS = st.lists(st.one_of(RANDOM_ROW, SFT_ROW, PAIR_ROW), min_size=1, max_size=8)


def as_rows(fields: list[dict[str, Any]]) -> list[Row]:
    return [Row(f, f"d.jsonl line {i + 1}") for i, f in enumerate(fields)]


@SETTINGS
@given(fields=ROWS, kind=st.sampled_from(KINDS))
def test_every_row_is_kept_or_counted_and_only_data_errors_are_raised(fields: list[dict[str, Any]], kind: str):
    rows = as_rows(fields)
    report = LoadReport()
    kept = validate_rows(rows, kind, on_bad_row="skip", report=report)
    # an unpaired kind's preference pair gives two examples, "(chosen)" and "(rejected)", of one row
    kept_rows = {e.where.removesuffix(" (chosen)").removesuffix(" (rejected)") for e in kept}
    assert len(kept_rows) + sum(report.skipped.values()) == len(rows)
    try:
        strict = validate_rows(rows, kind, on_bad_row="error")
    except DataError as error:
        first_bad = next(r for r in rows if r.where not in kept_rows)
        assert str(error).startswith(f"{first_bad.where}: ")  # names the first bad row
    else:
        assert strict == kept


@SETTINGS
@given(
    fields=st.lists(SFT_ROW, min_size=1, max_size=8),
    max_length=st.integers(min_value=1, max_value=96),
    truncation=st.sampled_from(["truncate", "drop"]),
    completion_only=st.booleans(),
)
def test_sft_rows_encode_collate_and_pack_within_max_length(
    byte_tokenizer, fields, max_length: int, truncation: str, completion_only: bool
):
    examples = validate_rows(as_rows(fields), "sft", on_bad_row="skip")
    report = LoadReport()
    try:
        tokens = encode_sft(
            examples,
            byte_tokenizer,
            max_length=max_length,
            truncation=truncation,
            completion_only=completion_only,
            report=report,
        )
    except DataError:  # documented: a chat template that cannot render a conversation's prefix
        return
    assert len(tokens) + report.dropped == len(examples)
    for t in tokens:
        assert 1 <= len(t.input_ids) <= max_length and len(t.loss_mask) == len(t.input_ids)
        assert any(t.loss_mask)  # a kept example always trains something
    if not tokens:
        return
    pad = byte_tokenizer.pad_token_id
    batch = collate_sft(tokens, pad_id=pad)
    assert batch.input_ids_B_T.shape == (len(tokens), max(len(t.input_ids) for t in tokens))
    assert not (batch.loss_mask_B_T & ~batch.attention_mask_B_T).any()  # targets are real tokens
    assert batch.num_target_tokens == sum(sum(t.loss_mask) for t in tokens)
    bins = pack_by_length([len(t.input_ids) for t in tokens], max_length=max_length)
    assert sorted(i for b in bins for i in b) == list(range(len(tokens)))  # each example once
    assert all(sum(len(tokens[i].input_ids) for i in b) <= max_length for b in bins)
    packed = collate_packed(tokens, bins, pad_id=pad)
    assert packed.num_target_tokens == batch.num_target_tokens
    for row, b in enumerate(bins):
        start = 0
        for i in b:  # every document starts at position 0 and is not a target there
            assert packed.position_ids_B_T[row, start] == 0 and not packed.loss_mask_B_T[row, start]
            start += len(tokens[i].input_ids)


@SETTINGS
@given(
    fields=st.lists(PAIR_ROW, min_size=1, max_size=6),
    max_length=st.integers(min_value=1, max_value=96),
    truncation=st.sampled_from(["truncate", "drop"]),
)
def test_preference_rows_encode_and_collate_within_max_length(byte_tokenizer, fields, max_length, truncation):
    examples = validate_rows(as_rows(fields), "preference", on_bad_row="skip")
    report = LoadReport()
    pairs = encode_preference(
        examples, byte_tokenizer, max_length=max_length, truncation=truncation, on_bad_row="skip", report=report
    )
    assert len(pairs) + report.dropped + report.skipped["identical pair"] == len(examples)
    for p in pairs:
        assert p.chosen_ids != p.rejected_ids  # an equal pair (a zero gradient) is skipped and counted
        for completion in (p.chosen_ids, p.rejected_ids):
            assert completion and len(p.prompt_ids) + len(completion) <= max_length
    if pairs:
        batch = collate_preference(pairs, pad_id=byte_tokenizer.pad_token_id)
        assert batch.input_ids_B_T.shape[0] == 2 * len(pairs)
        completion_lengths = [len(c) for p in pairs for c in (p.chosen_ids, p.rejected_ids)]
        assert batch.loss_mask_B_T.sum(dim=1).tolist() == completion_lengths
