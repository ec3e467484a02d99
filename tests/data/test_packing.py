"""Packed rows must give every document the log-probs it gets alone (no attention across documents)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from posttrain.data import SFTTokens, collate_packed, collate_sft, pack_by_length

# initializer_range 0.5 (not 0.02) so that attention is far from uniform and a leak shows in the logits
SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def tiny_model(family: str, attention: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SIZES, initializer_range=0.5, attn_implementation=attention))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**SIZES, initializer_range=0.5, attn_implementation=attention))
    return model.float().eval()


def token_logprobs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p(token t | tokens < t) for t >= 1, shape [B, T-1]."""
    logits_B_T_V = model(**inputs).logits
    logp_B_T_V = torch.log_softmax(logits_B_T_V[:, :-1], dim=-1)
    return logp_B_T_V.gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)


def documents() -> list[SFTTokens]:
    generator = torch.Generator().manual_seed(1)
    lengths = [7, 3, 9, 5, 1, 6]
    ids = [torch.randint(1, 64, (n,), generator=generator).tolist() for n in lengths]
    return [SFTTokens(seq, [False] + [True] * (len(seq) - 1), f"d{i}") for i, seq in enumerate(ids)]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_rows_match_each_document_alone(family: str, attention: str):
    model = tiny_model(family, attention)
    docs = documents()
    rows = pack_by_length([len(d.input_ids) for d in docs], max_length=12)
    # best-fit decreasing of lengths 9, 7, 6, 5, 3, 1 into 12: [9, 3], [7, 5], [6, 1]
    # -> documents [2, 1], [0, 3], [5, 4]
    assert rows == [[2, 1], [0, 3], [5, 4]]
    batch = collate_packed(docs, rows, pad_id=0)
    assert batch.packed and set(batch.model_inputs()) == {"input_ids", "position_ids", "use_cache"}
    with torch.no_grad():
        packed_B_T = token_logprobs(model, batch.model_inputs())
        for b, row in enumerate(rows):
            offset = 0
            for i in row:
                alone = collate_sft([docs[i]], pad_id=0)
                alone_T = token_logprobs(model, alone.model_inputs())[0]
                n = len(docs[i].input_ids)
                # packed position offset + t predicts token offset + t + 1, for t < n - 1
                torch.testing.assert_close(packed_B_T[b, offset:offset + n - 1], alone_T, atol=1e-5, rtol=0)
                offset += n


def test_packing_without_position_ids_would_leak_across_documents():
    # The check above has teeth: the same row run as one plain causal sequence differs for document 2.
    model = tiny_model("llama", "sdpa")
    docs = documents()
    batch = collate_packed(docs, [[0, 3]], pad_id=0)
    with torch.no_grad():
        packed_T = token_logprobs(model, batch.model_inputs())[0]
        leaky_T = token_logprobs(model, {"input_ids": batch.input_ids_B_T, "use_cache": False})[0]
    assert torch.allclose(packed_T[:6], leaky_T[:6], atol=1e-5)
    assert not torch.allclose(packed_T[7:], leaky_T[7:], atol=1e-3)


def test_packed_batch_positions_masks_and_target_count():
    docs = [SFTTokens([5, 6, 7], [False, True, True], "a"), SFTTokens([8, 9], [False, True], "b"),
            SFTTokens([10, 11, 12, 13], [False, False, True, True], "c")]
    batch = collate_packed(docs, [[0, 1], [2]], pad_id=0)
    # row 0: a(3) + b(2) = 5 tokens; row 1: c(4) + 1 pad whose position starts again at 0
    assert batch.input_ids_B_T.tolist() == [[5, 6, 7, 8, 9], [10, 11, 12, 13, 0]]
    assert batch.position_ids_B_T.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch.loss_mask_B_T.int().tolist() == [[0, 1, 1, 0, 1], [0, 0, 1, 1, 0]]
    assert batch.attention_mask_B_T.tolist() == [[True] * 5, [True] * 4 + [False]]
    assert batch.num_target_tokens == 5  # 2 + 1 + 2


def test_pack_by_length_rejects_a_sequence_longer_than_max_length():
    with pytest.raises(ValueError, match="sequence 1 has 9 tokens > max_length=8"):
        pack_by_length([3, 9], max_length=8)
