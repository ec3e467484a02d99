"""The native engine against the transformers reference, a fresh forward pass and a cache-free sampler."""

import pytest
import torch

from posttrain.policies import FrozenCopy
from posttrain.rollout import ENGINES, NativeEngine, Rollouts, SamplingParams
from posttrain.rollout.native import generate_geometric_mixture

native, hf = ENGINES["native"], ENGINES["hf"]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)


def full_forward_logprobs(
    model, prompt: list[int], completion: list[int], temperature: float
) -> torch.Tensor:
    """log_softmax(logits / T) of each completion token from one uncached forward of prompt + completion."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits_T_V = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    return (
        (logits_T_V / temperature).log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
    )


def greedy_without_cache(model, prompt: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
    """Reference greedy decoder: one prompt, no padding, no cache, no batch pruning."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] in stop_ids:
                break
    return ids[len(prompt) :]


def test_greedy_matches_hf_generate_under_left_padding(tiny_model, prompts):
    ours = native.generate(tiny_model, prompts, GREEDY, n=1)
    ref = hf.generate(tiny_model, prompts, GREEDY, n=1)
    assert ours.completion_ids == ref.completion_ids
    assert all(len(c) == 12 for c in ours.completion_ids)
    assert ours.finish_reasons == ["length"] * 4
    for a, b in zip(ours.logprobs, ref.logprobs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_greedy_groups_repeat_each_prompt_contiguously(tiny_model, prompts):
    single = native.generate(tiny_model, prompts, GREEDY, n=1)
    grouped = native.generate(tiny_model, prompts, GREEDY, n=3)
    assert grouped.group_size == 3
    assert grouped.completion_ids == [c for c in single.completion_ids for _ in range(3)]
    assert grouped.completion_ids == hf.generate(tiny_model, prompts, GREEDY, n=3).completion_ids


def test_rows_leaving_the_batch_do_not_change_the_others(tiny_model, prompts):
    # stop on tokens that the unstopped greedy runs produce early, so rows finish at different steps
    unstopped = native.generate(tiny_model, prompts, GREEDY, n=1).completion_ids
    stop_ids = {unstopped[0][2], unstopped[2][5]}
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=tuple(sorted(stop_ids)))
    ours = native.generate(tiny_model, prompts, params, n=2)
    expected = [greedy_without_cache(tiny_model, p, 12, stop_ids) for p in prompts for _ in range(2)]
    assert ours.completion_ids == expected
    assert ours.completion_ids == hf.generate(tiny_model, prompts, params, n=2).completion_ids
    # greedy n > 1 decodes each prompt once; top_k=1 sampling runs the expanded cache, pruning included
    top1 = SamplingParams(max_new_tokens=12, top_k=1, stop_token_ids=params.stop_token_ids)
    expanded = native.generate(tiny_model, prompts, top1, n=2, generator=torch.Generator().manual_seed(0))
    assert expanded.completion_ids == expected
    lengths = {len(c) for c in ours.completion_ids}
    assert len(lengths) > 1 and min(lengths) <= 3  # rows really did leave at different steps
    for completion, reason in zip(ours.completion_ids, ours.finish_reasons):
        ended_on_stop = completion[-1] in stop_ids
        assert reason == ("stop" if ended_on_stop else "length")
        assert not set(completion[:-1]) & stop_ids  # truncated at the first stop token, which is kept


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(1.0, 0, 1.0, 0.0), (0.7, 10, 0.9, 0.05)])
def test_sampled_logprobs_match_a_fresh_forward(tiny_model, temperature, top_k, top_p, min_p, prompts):
    params = SamplingParams(
        max_new_tokens=10,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        stop_token_ids=(7, 8),
    )
    out = native.generate(tiny_model, prompts, params, n=3, generator=torch.Generator().manual_seed(0))
    assert len(out.completion_ids) == 12 and len({tuple(c) for c in out.completion_ids}) > 4
    for i, (completion, logp) in enumerate(zip(out.completion_ids, out.logprobs)):
        assert logp.dtype == torch.float32 and logp.shape == (len(completion),)
        expected = full_forward_logprobs(tiny_model, prompts[i // 3], completion, temperature)
        torch.testing.assert_close(logp, expected, atol=1e-4, rtol=0)


def test_hf_engine_logprobs_match_a_fresh_forward(qwen2_model, prompts):
    params = SamplingParams(max_new_tokens=6, temperature=0.8, top_k=20)
    out = hf.generate(qwen2_model, prompts, params, n=2, generator=torch.Generator().manual_seed(0))
    for i, (completion, logp) in enumerate(zip(out.completion_ids, out.logprobs)):
        torch.testing.assert_close(
            logp, full_forward_logprobs(qwen2_model, prompts[i // 2], completion, 0.8), atol=1e-4, rtol=0
        )


def test_top_k_one_equals_greedy(tiny_model, prompts):
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=1)
    sampled = native.generate(tiny_model, prompts, params, n=2, generator=torch.Generator().manual_seed(5))
    greedy = native.generate(tiny_model, prompts, GREEDY, n=2)
    assert sampled.completion_ids == greedy.completion_ids


@pytest.mark.parametrize("engine_name", ["native", "hf"])
def test_seeded_sampling_is_reproducible(qwen2_model, engine_name, prompts):
    engine = ENGINES[engine_name]
    params = SamplingParams(max_new_tokens=8, temperature=1.0)

    def run(seed: int) -> Rollouts:
        return engine.generate(
            qwen2_model, prompts, params, n=2, generator=torch.Generator().manual_seed(seed)
        )

    first, again, other = run(11), run(11), run(12)
    assert first.completion_ids == again.completion_ids
    assert first.completion_ids != other.completion_ids


@pytest.mark.parametrize("engine_name", ["native", "hf"])
def test_stop_strings_end_generation_after_the_completing_token(
    qwen2_model, char_tokenizer, engine_name, prompts
):
    unstopped = native.generate(qwen2_model, prompts, GREEDY, n=1).completion_ids
    texts = [char_tokenizer.decode(c) for c in unstopped]  # one character per token
    stop_strings = (texts[1][2:4], texts[3][1:3])  # two-token strings taken from rows 1 and 3
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_strings=stop_strings)
    out = ENGINES[engine_name].generate(qwen2_model, prompts, params, n=1, tokenizer=char_tokenizer)
    for completion, text, reason in zip(out.completion_ids, texts, out.finish_reasons):
        ends = [text.find(s) + len(s) for s in stop_strings if s in text]
        expected_len = min(ends, default=12)
        assert len(completion) == expected_len
        assert reason == ("stop" if ends else "length")
    assert out.finish_reasons[1] == out.finish_reasons[3] == "stop"


def test_native_engine_runs_on_the_model_device(qwen2_model):
    out = NativeEngine().generate(
        qwen2_model,
        [[1, 2]],
        SamplingParams(max_new_tokens=3),
        n=1,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.logprobs[0].device == qwen2_model.device


def mixture_without_cache(policy, reference, prompt: list[int], mixture_coef: float, steps: int, stop_ids: set[int]):
    """Reference Nash-MD mixture decoder: one prompt, no padding, no cache; greedy on
    (1 - m) log_softmax(policy) + m log_softmax(reference). Returns the tokens and log_softmax of that
    mixture at each chosen token."""
    ids, logps = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            x = torch.tensor([ids])
            mixed_V = (1 - mixture_coef) * policy(input_ids=x).logits[0, -1].float().log_softmax(-1) + (
                mixture_coef * reference(input_ids=x).logits[0, -1].float().log_softmax(-1)
            )
            ids.append(int(mixed_V.argmax()))
            logps.append(float(mixed_V.log_softmax(-1)[ids[-1]]))
            if ids[-1] in stop_ids:
                break
    return ids[len(prompt) :], torch.tensor(logps)


@pytest.mark.parametrize("mixture_coef", [0.0, 0.3, 1.0])
def test_geometric_mixture_equals_a_cache_free_mixture_decoder(qwen2_model, llama_model, mixture_coef, prompts):
    reference = llama_model  # another family and other weights: the two caches must stay apart
    params = SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=(7, 8))
    out = generate_geometric_mixture(
        qwen2_model, FrozenCopy(reference), prompts, params, n=1, mixture_coef=mixture_coef
    )
    for prompt, completion, logp in zip(prompts, out.completion_ids, out.logprobs, strict=True):
        expected, expected_logp = mixture_without_cache(qwen2_model, reference, prompt, mixture_coef, 10, {7, 8})
        assert completion == expected
        torch.testing.assert_close(logp, expected_logp, atol=1e-4, rtol=0)
    alone = native.generate(qwen2_model if mixture_coef == 0.0 else reference, prompts, params, n=1)
    assert (out.completion_ids == alone.completion_ids) == (mixture_coef in (0.0, 1.0))


def test_sampled_geometric_mixture_groups_leave_the_batch_like_the_engine(qwen2_model, llama_model, prompts):
    # m = 0: the mixture is the policy itself, so seeded sampling must give the engine's own samples,
    # rows finishing at different steps included
    params = SamplingParams(max_new_tokens=10, temperature=1.0, stop_token_ids=(7, 8))
    mixed = generate_geometric_mixture(qwen2_model, FrozenCopy(llama_model), prompts, params, n=3, mixture_coef=0.0,
                                       generator=torch.Generator().manual_seed(3))  # fmt: skip
    alone = native.generate(qwen2_model, prompts, params, n=3, generator=torch.Generator().manual_seed(3))
    assert mixed.completion_ids == alone.completion_ids
    assert len({len(c) for c in mixed.completion_ids}) > 1
    for a, b in zip(mixed.logprobs, alone.logprobs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
