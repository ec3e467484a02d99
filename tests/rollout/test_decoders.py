"""The static-cache decoder (the native engine's fast path) against the model's own forward."""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from posttrain.policies.families import family_of
from posttrain.rollout import ENGINES, NativeEngine, SamplingParams, decoders
from posttrain.rollout.decoders import (
    CudaGraphsChoiceError,
    GraphedDecoder,
    HFCacheDecoder,
    StaticCacheDecoder,
    build_decoder,
    cuda_graphs_enabled,
    supports_static,
)
from posttrain.rollout.native import left_pad


def uncached_logits(model, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """Next-token logits after prompt + continuation, from one forward of the unpadded row."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([prompt + continuation])).logits[0, -1].float()


@pytest.fixture(params=["packed", "unpacked"])
def decode_path(request, monkeypatch) -> str:
    """Both decode steps of a small float32 CPU model: through packed layer ops (the default) and unpacked."""
    if request.param == "unpacked":
        monkeypatch.setattr(decoders, "PACK_MAX_VALUES", 0)
    return request.param


def with_random_norms(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy whose RMSNorm weights are far from their initial ones, so that folding them into products shows."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(0.5 + torch.rand(param.shape, generator=gen))
    return model


def test_prefill_and_steps_equal_the_models_forward(tiny_model, prompts, decode_path):
    # prompts of 3, 7, 1, 5 tokens (left padding up to 6), each expanded to 2 rows; rows 1 and 6 leave
    # after the second step: every remaining row's logits must equal a fresh forward of its own tokens
    decoder = StaticCacheDecoder(tiny_model, max_new_tokens=4)
    assert (decoder.packed is not None) == (decode_path == "packed")
    with torch.no_grad():
        logits_P_V = decoder.prefill(*left_pad(prompts, torch.device("cpu")))
        for p, prompt in enumerate(prompts):
            torch.testing.assert_close(logits_P_V[p], uncached_logits(tiny_model, prompt, []), atol=1e-4, rtol=0)
        decoder.expand(2)
        rows = [p for p in range(4) for _ in range(2)]  # prompt of each active row
        fed: list[list[int]] = [[] for _ in rows]
        gen = torch.Generator().manual_seed(0)
        for step in range(3):
            tokens_A = torch.randint(0, 64, (len(rows),), generator=gen)
            logits_A_V = decoder.step(tokens_A)
            for a, token in enumerate(tokens_A.tolist()):
                fed[a].append(token)
                expected = uncached_logits(tiny_model, prompts[rows[a]], fed[a])
                torch.testing.assert_close(logits_A_V[a], expected, atol=1e-4, rtol=0)
            if step == 1:
                keep = [a for a in range(len(rows)) if a not in (1, 6)]
                decoder.select(torch.tensor(keep))
                rows, fed = [rows[a] for a in keep], [fed[a] for a in keep]


def test_prompts_of_one_token_each_decode_like_generate(qwen2_model, decode_path):
    # a prefill of width 1 is still a prefill (boolean mask, fused attention), not a decode step
    greedy = SamplingParams(max_new_tokens=5, temperature=0.0)
    ours = ENGINES["native"].generate(qwen2_model, [[5], [7], [60]], greedy, n=2)
    assert ours.completion_ids == ENGINES["hf"].generate(qwen2_model, [[5], [7], [60]], greedy, n=2).completion_ids
    assert all(len(c) == 5 for c in ours.completion_ids)


@pytest.mark.parametrize("biases", [False, True])
def test_the_packed_step_equals_the_models_forward_with_norm_weights_and_biases(prompts, biases):
    # the packed step folds every RMSNorm weight into the products after it and stacks q/k/v and gate/up, their
    # biases too: a Llama with biases on every projection (o and down add theirs outside the residual product),
    # norm weights between 0.5 and 1.5, against fresh forwards of each row's tokens
    config = LlamaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, initializer_range=0.2,
                         attention_bias=biases, mlp_bias=biases)  # fmt: skip
    torch.manual_seed(2)
    model = with_random_norms(LlamaForCausalLM(config).eval(), seed=3)
    decoder = StaticCacheDecoder(model, max_new_tokens=3)
    assert decoder.packed is not None
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        decoder.prefill(*left_pad(prompts, torch.device("cpu")))
        fed: list[list[int]] = [[] for _ in prompts]
        for _ in range(3):
            tokens_A = torch.randint(0, 64, (len(prompts),), generator=gen)
            logits_A_V = decoder.step(tokens_A)
            for a, token in enumerate(tokens_A.tolist()):
                fed[a].append(token)
                torch.testing.assert_close(logits_A_V[a], uncached_logits(model, prompts[a], fed[a]), atol=1e-4, rtol=0)


def test_packing_applies_to_small_float32_cpu_models_with_plain_layers_only(qwen2_model, monkeypatch):
    def packed(model):
        return decoders.packed_layers(model, family_of(model), list(model.model.layers))

    assert packed(qwen2_model) is not None
    assert packed(copy.deepcopy(qwen2_model).to(torch.bfloat16)) is None
    monkeypatch.setattr(decoders, "PACK_MAX_VALUES", sum(p.numel() for p in qwen2_model.parameters()) // 2)
    assert packed(qwen2_model) is None  # over the size limit
    monkeypatch.undo()
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(copy.deepcopy(qwen2_model), peft.LoraConfig(r=2, target_modules=["v_proj"]))
    assert packed(wrapped.get_base_model()) is None  # a LoRA layer runs as its module


def test_static_path_samples_what_the_generic_path_samples(tiny_model, prompts):
    # same seed, same draws: the two decoders give the same tokens and log-probs (sampled, with stops)
    class GenericEngine(NativeEngine):
        def decoder(self, model, max_new_tokens):
            return HFCacheDecoder(model)

    params = SamplingParams(max_new_tokens=10, temperature=0.9, stop_token_ids=(5, 9))
    fast = ENGINES["native"].generate(tiny_model, prompts, params, n=3, generator=torch.Generator().manual_seed(1))
    plain = GenericEngine().generate(tiny_model, prompts, params, n=3, generator=torch.Generator().manual_seed(1))
    assert fast.completion_ids == plain.completion_ids
    assert fast.finish_reasons == plain.finish_reasons
    for a, b in zip(fast.logprobs, plain.logprobs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_other_architectures_take_the_generic_path():
    # families without an adapter; sliding windows have one (tests/policies/test_families.py)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2))
    assert not supports_static(gpt2)
    assert isinstance(build_decoder(gpt2, 4), HFCacheDecoder)
    sliding = Qwen2ForCausalLM(
        Qwen2Config(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                    intermediate_size=32, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    )  # fmt: skip
    assert supports_static(sliding)


@pytest.mark.parametrize("rope", ["dynamic", "longrope", "linear"])
def test_rope_chosen_from_the_longest_position_takes_the_generic_path(rope):
    # dynamic and longrope RoPE pick their frequencies from the largest position a forward sees: one table over
    # every slot of a generation (3 prompt tokens + 8 new, past max_position_embeddings = 8) would scale the
    # angles of a sequence that stays within 8 positions (logits off by 0.7-3 at the prefill, found by fuzzing)
    parameters = {
        "dynamic": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
        "longrope": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8,
                     "original_max_position_embeddings": 8, "rope_theta": 10000.0},
        "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    }[rope]  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=8, initializer_range=0.3, rope_parameters=parameters)
    ).eval()  # fmt: skip
    assert supports_static(model) == (rope == "linear")
    prompt, fed = [5, 17, 33], [1, 2, 3, 4]
    decoder = build_decoder(model, 8)
    with torch.no_grad():
        logits = [decoder.prefill(*left_pad([prompt], torch.device("cpu")))[0]]
        logits += [decoder.step(torch.tensor([t]))[0] for t in fed]
        for i, got in enumerate(logits):
            expected = model(torch.tensor([prompt + fed[:i]])).logits[0, -1]
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_a_model_with_forward_hooks_takes_the_generic_path(qwen2_model):
    # the static decoder calls the layers' Linear maths directly, so a hook (FSDP's weight gathering, a probe)
    # would silently not run: the hooked model decodes through its own forward
    assert supports_static(qwen2_model)
    seen = []
    handle = qwen2_model.model.layers[0].mlp.register_forward_pre_hook(lambda module, args: seen.append(1))
    try:
        assert not supports_static(qwen2_model)
        assert isinstance(build_decoder(qwen2_model, 4), HFCacheDecoder)
    finally:
        handle.remove()
    assert supports_static(qwen2_model)


def test_lora_wrapped_model_decodes_like_its_merged_weights(qwen2_model, prompts):
    # LoRA layers are called as modules (no weight fusion): greedy tokens equal the merged model's
    peft = pytest.importorskip("peft")
    import copy

    wrapped = peft.get_peft_model(
        copy.deepcopy(qwen2_model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    )
    for name, param in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5, generator=torch.Generator().manual_seed(len(name)))
    assert supports_static(wrapped)
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    ours = ENGINES["native"].generate(wrapped, prompts, greedy, n=1)
    merged = copy.deepcopy(wrapped).merge_and_unload()
    assert ours.completion_ids == ENGINES["hf"].generate(merged, prompts, greedy, n=1).completion_ids


def test_the_graph_ready_step_equals_the_static_decoder_with_rows_leaving(tiny_model, prompts):
    # GraphedDecoder's step (run eagerly on CPU: what a CUDA graph would replay) against StaticCacheDecoder:
    # same logits at every step, while rows 1 and 6, then row 3, stop being returned (they stay in its batch)
    plain, graphed = StaticCacheDecoder(tiny_model, 5), GraphedDecoder(tiny_model, 5, capture=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        padded = left_pad(prompts, torch.device("cpu"))
        torch.testing.assert_close(graphed.prefill(*padded), plain.prefill(*padded))
        for d in (plain, graphed):
            d.expand(2)
        graphed.step(torch.zeros(8, dtype=torch.long))  # builds the static buffers ...
        inner = graphed.inner
        inner.slot = inner.positions_A = None  # ... after which a replayed step may read no Python-side state
        graphed._undo_step()  # back to before that step, which the next one overwrites
        active = 8
        for step in range(4):
            tokens_A = torch.randint(0, 64, (active,), generator=gen)
            torch.testing.assert_close(graphed.step(tokens_A), plain.step(tokens_A), atol=1e-5, rtol=0)
            keep = {0: [0, 2, 3, 4, 5, 7], 1: [0, 1, 3, 4, 5]}.get(step)
            if keep is not None:
                for d in (plain, graphed):
                    d.select(torch.tensor(keep))
                active = len(keep)


def test_the_graph_ready_engine_samples_what_the_native_engine_samples(tiny_model, prompts):
    class GraphReadyEngine(NativeEngine):
        def decoder(self, model, max_new_tokens):
            return GraphedDecoder(model, max_new_tokens, capture=False)

    # stopping at every seventh token id ends most rows early, at different steps (the static batch keeps them)
    params = SamplingParams(max_new_tokens=10, temperature=0.9, stop_token_ids=tuple(range(0, 64, 7)))
    fast = ENGINES["native"].generate(tiny_model, prompts, params, n=3, generator=torch.Generator().manual_seed(1))
    ready = GraphReadyEngine().generate(tiny_model, prompts, params, n=3, generator=torch.Generator().manual_seed(1))
    assert ready.completion_ids == fast.completion_ids
    assert ready.finish_reasons == fast.finish_reasons
    assert any(r == "stop" for r in fast.finish_reasons) and any(r == "length" for r in fast.finish_reasons)
    for a, b in zip(ready.logprobs, fast.logprobs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_cuda_graphs_are_off_unless_asked_and_a_bad_value_is_named(tiny_model, monkeypatch):
    assert not cuda_graphs_enabled()
    monkeypatch.setenv("POSTTRAIN_CUDA_GRAPHS", "1")
    assert cuda_graphs_enabled()
    assert isinstance(build_decoder(tiny_model, 4), StaticCacheDecoder)  # a CPU model never captures
    monkeypatch.setenv("POSTTRAIN_CUDA_GRAPHS", "yes")
    with pytest.raises(CudaGraphsChoiceError, match="POSTTRAIN_CUDA_GRAPHS='yes'"):
        cuda_graphs_enabled()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_the_captured_cuda_graph_replays_what_the_eager_step_computes(qwen2_model, prompts):
    # on a GPU: the captured step's logits equal the eager static decoder's, rows leaving, over several replays
    model = copy.deepcopy(qwen2_model).cuda()
    plain, graphed = StaticCacheDecoder(model, 6), GraphedDecoder(model, 6, capture=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.inference_mode():
        padded = left_pad(prompts, torch.device("cuda"))
        torch.testing.assert_close(graphed.prefill(*padded), plain.prefill(*padded))
        for d in (plain, graphed):
            d.expand(3)
        active = 12
        for step in range(5):
            tokens_A = torch.randint(0, 64, (active,), generator=gen, device="cuda")
            torch.testing.assert_close(graphed.step(tokens_A), plain.step(tokens_A), atol=1e-4, rtol=0)
            if step == 1:
                keep = torch.tensor([0, 2, 5, 7, 8, 11], device="cuda")
                for d in (plain, graphed):
                    d.select(keep)
                active = len(keep)
        assert graphed.graph is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("graphs", ["0", "1"])
def test_on_cuda_the_native_engine_decodes_greedily_like_generate(qwen2_model, prompts, graphs, monkeypatch):
    # the whole engine on a GPU, eager and with the decode step captured as a CUDA graph (bench/gpu_check.sh)
    monkeypatch.setenv("POSTTRAIN_CUDA_GRAPHS", graphs)
    model = copy.deepcopy(qwen2_model).cuda()
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=(5,))
    ours = ENGINES["native"].generate(model, prompts, greedy, n=2)
    assert ours.completion_ids == ENGINES["hf"].generate(model, prompts, greedy, n=2).completion_ids
