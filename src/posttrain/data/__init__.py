"""Rows -> validated examples -> token batches (masks, packing, bucketing).

    rows = read_rows(path)                        # readers.py: JSONL, JSON, Parquet, CSV, datasets dir
    examples = validate_rows(rows, "sft", on_bad_row="skip", report=report)  # examples.py
    tokens = encode_sft(examples, tokenizer, max_length=1024, report=report)  # encoding.py
    batch = collate_sft([tokens[i] for i in batch_indices], pad_id=tokenizer.pad_token_id)  # batching.py

`load_examples(path, kind)` does the first two steps and returns the `LoadReport`. Nothing here imports
the config, trainer or CLI layers: helpers take plain values.
"""

from posttrain.data.batching import (
    TokenBatch,
    batch_packed_rows,
    bucket_by_length,
    chunks,
    collate_completions,
    collate_packed,
    collate_preference,
    collate_prompts,
    collate_sequences,
    collate_sft,
    count_padding,
    pack_by_length,
)
from posttrain.data.compact import CompactExamples
from posttrain.data.encoding import (
    CompletionTokens,
    PreferenceTokens,
    PromptTokens,
    SFTTokens,
    check_positions,
    encode_completion,
    encode_conversation,
    encode_listwise,
    encode_preference,
    encode_prompt,
    encode_prompts,
    encode_sft,
    encode_sft_example,
    encode_sft_turns,
    encode_unpaired,
    render_chat,
)
from posttrain.data.errors import DataError
from posttrain.data.examples import (
    ROLES,
    Example,
    ListwiseExample,
    PreferenceExample,
    PromptExample,
    SFTExample,
    UnpairedExample,
    load_examples,
    validate_rows,
)
from posttrain.data.readers import Row, iter_rows, read_rows
from posttrain.data.report import LoadReport
from posttrain.data.sampler import EpochSampler

__all__ = [
    "ROLES",
    "CompactExamples",
    "CompletionTokens",
    "DataError",
    "EpochSampler",
    "Example",
    "ListwiseExample",
    "LoadReport",
    "PreferenceExample",
    "PreferenceTokens",
    "PromptExample",
    "PromptTokens",
    "Row",
    "SFTExample",
    "SFTTokens",
    "TokenBatch",
    "UnpairedExample",
    "batch_packed_rows",
    "bucket_by_length",
    "check_positions",
    "chunks",
    "collate_completions",
    "collate_packed",
    "collate_preference",
    "collate_prompts",
    "collate_sequences",
    "collate_sft",
    "count_padding",
    "encode_completion",
    "encode_conversation",
    "encode_listwise",
    "encode_preference",
    "encode_prompt",
    "encode_prompts",
    "encode_sft",
    "encode_sft_example",
    "encode_sft_turns",
    "encode_unpaired",
    "iter_rows",
    "load_examples",
    "pack_by_length",
    "read_rows",
    "render_chat",
    "validate_rows",
]
