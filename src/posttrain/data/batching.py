"""Token sequences -> padded or packed tensors; length bucketing and packing plans.

Padding is on the right with the tokenizer's pad id (generation prompts: on the left).

Packing puts several documents in one row up to `max_length`, with `position_ids` restarting at 0 at
each document, and passes NO attention mask and no KV cache to the model (`TokenBatch.model_inputs`).
transformers
(>= 4.56; here 5.x) then detects the restarts in `position_ids` (`masking_utils.
find_packed_sequence_indices`) and builds a block-diagonal causal mask for eager and sdpa attention;
flash-attention kernels use the same `position_ids` for variable-length attention. The row's padding
tail gets positions 0, 1, ... and so forms its own block. tests/data/test_packing.py holds the
per-token log-probs of a packed row equal to each document run alone (Llama, Qwen2; eager, sdpa).
A document's first token is never a target (its loss_mask is False), so no document is trained to
follow the one before it.
"""

import bisect
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from posttrain.data.encoding import CompletionTokens, PreferenceTokens, PromptTokens, SFTTokens


@dataclass(frozen=True)
class TokenBatch:
    """Sequences as tensors, all [B, T].

    input_ids_B_T: token ids, padding = pad id.
    attention_mask_B_T: True on real tokens.
    loss_mask_B_T: True where the token is a target (predicted from position t - 1).
    position_ids_B_T: position within each document (restarts per packed document).
    num_target_tokens: loss_mask_B_T.sum(), the count token-level loss aggregation divides by.
    packed: rows hold several documents; the model must get position ids and no attention mask.
    """

    input_ids_B_T: Tensor
    attention_mask_B_T: Tensor
    loss_mask_B_T: Tensor
    position_ids_B_T: Tensor
    num_target_tokens: int
    packed: bool = False

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments for a Hugging Face causal LM's forward (a training forward: no KV cache,
        which transformers also requires to detect packed documents from position ids)."""
        if self.packed:
            return {"input_ids": self.input_ids_B_T, "position_ids": self.position_ids_B_T,
                    "use_cache": False}
        return {"input_ids": self.input_ids_B_T, "attention_mask": self.attention_mask_B_T.long(),
                "use_cache": False}


def collate_sequences(ids: Sequence[Sequence[int]], loss_masks: Sequence[Sequence[bool]], *,
                      pad_id: int) -> TokenBatch:
    """Right-pad B sequences to the longest. Position 0 of a row is never a target."""
    width = max(len(seq) for seq in ids)
    input_ids_B_T = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attention_mask_B_T = torch.zeros((len(ids), width), dtype=torch.bool)
    loss_mask_B_T = torch.zeros((len(ids), width), dtype=torch.bool)
    for b, (seq, mask) in enumerate(zip(ids, loss_masks, strict=True)):
        input_ids_B_T[b, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask_B_T[b, :len(seq)] = True
        loss_mask_B_T[b, :len(seq)] = torch.tensor(mask, dtype=torch.bool)
    loss_mask_B_T[:, 0] = False
    position_ids_B_T = torch.arange(width).expand(len(ids), width).clone()
    return TokenBatch(input_ids_B_T, attention_mask_B_T, loss_mask_B_T, position_ids_B_T,
                      int(loss_mask_B_T.sum()))


def collate_sft(items: Sequence[SFTTokens], *, pad_id: int) -> TokenBatch:
    """One row per demonstration."""
    return collate_sequences([it.input_ids for it in items], [it.loss_mask for it in items], pad_id=pad_id)


def collate_preference(items: Sequence[PreferenceTokens], *, pad_id: int) -> TokenBatch:
    """2N rows for N pairs, each pair's two rows adjacent: row 2i is `prompt + chosen` of pair i, row 2i + 1
    `prompt + rejected` (one forward for both, and the unpadded forward computes their shared prompt once).
    Targets are the completion tokens."""
    ids, masks = [], []
    for it in items:
        for completion in (it.chosen_ids, it.rejected_ids):
            ids.append(it.prompt_ids + completion)
            masks.append([False] * len(it.prompt_ids) + [True] * len(completion))
    return collate_sequences(ids, masks, pad_id=pad_id)


def collate_completions(items: Sequence[CompletionTokens], *, pad_id: int) -> tuple[TokenBatch, Tensor]:
    """One row per (prompt, completion), completions of one prompt contiguous (unpaired: one per
    prompt; listwise: a group per prompt). Targets are the completion tokens.

    Returns the batch and `group_B` [B], the index of each row's prompt in `items`.
    """
    ids, masks, group = [], [], []
    for index, it in enumerate(items):
        for completion in it.completion_ids:
            ids.append(it.prompt_ids + completion)
            masks.append([False] * len(it.prompt_ids) + [True] * len(completion))
            group.append(index)
    return collate_sequences(ids, masks, pad_id=pad_id), torch.tensor(group, dtype=torch.long)


def collate_prompts(items: Sequence[PromptTokens], *, pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-padded prompts for generation: (`prompt_ids_B_T`, `attention_mask_B_T` bool)."""
    width = max(len(it.prompt_ids) for it in items)
    prompt_ids_B_T = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention_mask_B_T = torch.zeros((len(items), width), dtype=torch.bool)
    for b, it in enumerate(items):
        prompt_ids_B_T[b, width - len(it.prompt_ids):] = torch.tensor(it.prompt_ids, dtype=torch.long)
        attention_mask_B_T[b, width - len(it.prompt_ids):] = True
    return prompt_ids_B_T, attention_mask_B_T


# --- bucketing ----------------------------------------------------------------------------------------

def bucket_by_length(lengths: Sequence[int], *, batch_size: int, seed: int,
                     window_batches: int | None = None) -> list[list[int]]:
    """Batches of indices whose lengths are close, so that little of a padded batch is padding.

    The indices are shuffled (seeded), then each window of `window_batches * batch_size` of them is sorted
    by length and cut into batches, and the batch order is shuffled. `window_batches=None` sorts the whole
    dataset (least padding); a small window keeps more randomness in which examples meet.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = len(order) if window_batches is None else window_batches * batch_size
    batches = []
    for start in range(0, len(order), max(window, 1)):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def count_padding(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> int:
    """Pad tokens the batches would hold when each is padded to its longest sequence."""
    return sum(max(lengths[i] for i in batch) * len(batch) - sum(lengths[i] for i in batch)
               for batch in batches)


# --- packing ------------------------------------------------------------------------------------------

def pack_by_length(lengths: Sequence[int], *, max_length: int) -> list[list[int]]:
    """Best-fit decreasing: bins of indices whose lengths sum to at most `max_length`.

    Each sequence, longest first, goes to the open bin it fills most tightly, or to a new bin. Sequences
    must already fit (`encode_sft(..., max_length=...)`); a longer one raises ValueError.
    """
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        raise ValueError(f"pack_by_length: sequence {too_long[0]} has {lengths[too_long[0]]} tokens > "
                         f"max_length={max_length}; truncate or drop first")
    bins: list[list[int]] = []
    open_bins: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = bisect.bisect_left(open_bins, (lengths[i], -1))
        if slot == len(open_bins):
            bins.append([i])
            room, b = max_length - lengths[i], len(bins) - 1
        else:
            room, b = open_bins.pop(slot)
            bins[b].append(i)
            room -= lengths[i]
        bisect.insort(open_bins, (room, b))
    return bins


def batch_packed_rows(bins: Sequence[list[int]], *, rows_per_batch: int, seed: int) -> list[list[list[int]]]:
    """Shuffle packed rows (seeded) and group them `rows_per_batch` to a batch."""
    order = list(bins)
    random.Random(seed).shuffle(order)
    return [order[i:i + rows_per_batch] for i in range(0, len(order), rows_per_batch)]


def collate_packed(items: Sequence[SFTTokens], rows: Sequence[Sequence[int]], *, pad_id: int) -> TokenBatch:
    """One row per bin of `items` indices: documents concatenated, position ids restarting at each,
    right padding to the longest row (the padding tail gets positions 0, 1, ... of its own)."""
    ids = [[t for i in row for t in items[i].input_ids] for row in rows]
    masks = [[m for i in row for m in items[i].loss_mask] for row in rows]
    batch = collate_sequences(ids, masks, pad_id=pad_id)
    width = batch.input_ids_B_T.shape[1]
    position_ids_B_T = torch.zeros_like(batch.input_ids_B_T)
    for b, row in enumerate(rows):
        lengths = [len(items[i].input_ids) for i in row]
        lengths.append(width - sum(lengths))
        position_ids_B_T[b] = torch.cat([torch.arange(n) for n in lengths])
    return TokenBatch(batch.input_ids_B_T, batch.attention_mask_B_T, batch.loss_mask_B_T, position_ids_B_T,
                      batch.num_target_tokens, packed=True)


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
