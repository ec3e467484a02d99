import random

import torch

from posttrain.data import (
    PreferenceTokens,
    PromptTokens,
    SFTTokens,
    batch_packed_rows,
    bucket_by_length,
    collate_preference,
    collate_prompts,
    collate_sft,
    count_padding,
    pack_by_length,
)


def test_collate_sft_pads_right_with_the_pad_id():
    items = [SFTTokens([5, 6, 7], [False, True, True], "a"), SFTTokens([8, 9], [False, True], "b")]
    batch = collate_sft(items, pad_id=0)
    assert batch.input_ids_B_T.tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch.attention_mask_B_T.tolist() == [[True, True, True], [True, True, False]]
    assert batch.loss_mask_B_T.tolist() == [[False, True, True], [False, True, False]]
    assert batch.position_ids_B_T.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert batch.num_target_tokens == 3
    inputs = batch.model_inputs()
    assert set(inputs) == {"input_ids", "attention_mask", "use_cache"}
    assert inputs["attention_mask"].dtype == torch.long


def test_collate_preference_puts_each_rejected_row_after_its_chosen_row():
    pairs = [PreferenceTokens([1, 2], [3], [4, 4], "a"), PreferenceTokens([1], [5, 5, 5], [6], "b")]
    batch = collate_preference(pairs, pad_id=0)
    assert batch.input_ids_B_T.tolist() == [[1, 2, 3, 0], [1, 2, 4, 4], [1, 5, 5, 5], [1, 6, 0, 0]]
    assert batch.loss_mask_B_T.int().tolist() == [[0, 0, 1, 0], [0, 0, 1, 1], [0, 1, 1, 1], [0, 1, 0, 0]]
    assert batch.num_target_tokens == 7  # 1 + 3 + 2 + 1


def test_collate_prompts_pads_left_for_generation():
    prompts = [PromptTokens([1, 2, 3], "a"), PromptTokens([4], "b")]
    prompt_ids_B_T, attention_mask_B_T = collate_prompts(prompts, pad_id=0)
    assert prompt_ids_B_T.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert attention_mask_B_T.tolist() == [[True, True, True], [False, False, True]]


def test_bucketing_reduces_padding_and_covers_every_example_once():
    lengths = [random.Random(i).randint(1, 200) for i in range(256)]
    batches = bucket_by_length(lengths, batch_size=8, seed=3)
    assert sorted(i for batch in batches for i in batch) == list(range(256))
    in_order = [list(range(i, i + 8)) for i in range(0, 256, 8)]
    # sorted buckets: each batch spans a narrow length range, so padding falls far below arbitrary batches
    assert count_padding(lengths, batches) < count_padding(lengths, in_order) / 5


def test_bucketing_is_seeded_and_hand_checked_on_a_small_case():
    lengths = [5, 1, 4, 2, 6, 3]
    batches = bucket_by_length(lengths, batch_size=2, seed=0)
    # sorted by length: 1(i1) 2(i3) 3(i5) 4(i2) 5(i0) 6(i4) -> batches {1,3}, {5,2}, {0,4}, in a seeded order
    assert sorted(sorted(b) for b in batches) == [[0, 4], [1, 3], [2, 5]]
    assert count_padding(lengths, batches) == 3  # 1 + 1 + 1
    assert bucket_by_length(lengths, batch_size=2, seed=0) == batches
    orders = {tuple(map(tuple, bucket_by_length(lengths, batch_size=2, seed=s))) for s in range(10)}
    assert len(orders) > 1  # the batch order changes with the seed


def test_windowed_bucketing_sorts_only_within_windows():
    lengths = list(range(16))
    batches = bucket_by_length(lengths, batch_size=2, seed=1, window_batches=2)
    assert sorted(i for batch in batches for i in batch) == list(range(16))
    assert all(lengths[b[0]] <= lengths[b[1]] for b in batches)


def test_pack_by_length_is_best_fit_decreasing():
    # lengths 6, 5, 4, 3, 2 into 10: 6 -> new bin A (room 4); 5 -> new bin B (room 5);
    # 4 -> tightest fit A (room 0); 3 -> B (room 2); 2 -> B (room 0)
    bins = pack_by_length([4, 6, 2, 5, 3], max_length=10)
    assert bins == [[1, 0], [3, 4, 2]]
    rows = batch_packed_rows(bins, rows_per_batch=1, seed=0)
    assert sorted(rows) == [[[1, 0]], [[3, 4, 2]]]
