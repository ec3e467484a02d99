"""The vLLM engine against the native one and the trainer's forward (`make test-vllm`, in .venv-vllm).

Skipped where vLLM is not installed (the project's own environment). vLLM's CPU attention needs a head size of at
least 32, so the models here have 2 heads of 32 (the shared fixtures' 16 are too small).
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from posttrain.api import rl
from posttrain.policies import apply_lora, token_logprobs
from posttrain.rollout import ENGINES, SamplingParams
from posttrain.rollout.vllm import VLLMEngine, WeightSyncError, checkpoint_weights, weights_version

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed here")

SHAPE = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             intermediate_size=128, initializer_range=0.2, max_position_embeddings=128)  # fmt: skip
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15, 16]]


def build(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**SHAPE)).eval()


@pytest.fixture(scope="module")
def engine() -> VLLMEngine:
    """One engine for the module: every model here has the same config, so it is built once and pushed into."""
    return VLLMEngine()


def trainer_logprobs(model, rollouts, temperature: float) -> list[torch.Tensor]:
    """The trainer's log-probs of each completion (independent of the engine: the training forward)."""
    padded = rollouts.to_padded(pad_id=0)
    with torch.no_grad():
        logp_B_T, _ = token_logprobs(model, padded.input_ids_B_T, padded.attention_mask_B_T, padded.loss_mask_B_T,
                                     temperature=temperature)  # fmt: skip
    starts = padded.prompt_lengths_B.tolist()
    return [logp_B_T[b, s : s + len(c)] for b, (s, c) in enumerate(zip(starts, rollouts.completion_ids))]


def test_greedy_tokens_equal_the_native_engine(engine):
    model = build()
    params = SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=(40,))
    ours = engine.generate(model, PROMPTS, params, n=2)
    native = ENGINES["native"].generate(model, PROMPTS, params, n=2)
    assert ours.completion_ids == native.completion_ids
    assert ours.finish_reasons == native.finish_reasons
    for a, b in zip(ours.logprobs, native.logprobs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_sampled_log_probs_are_the_trainers_and_seeded_draws_repeat(engine):
    model = build()
    for top_k in (0, 5):  # without a filter vLLM's own log-probs; with one the policy's unfiltered ones
        params = SamplingParams(max_new_tokens=8, temperature=0.7, top_k=top_k)
        first = engine.generate(model, PROMPTS, params, n=4, generator=torch.Generator().manual_seed(3))
        again = engine.generate(model, PROMPTS, params, n=4, generator=torch.Generator().manual_seed(3))
        assert first.completion_ids == again.completion_ids
        assert len({tuple(c) for c in first.completion_ids[:4]}) > 1  # a group's samples differ
        for ours, trainer in zip(first.logprobs, trainer_logprobs(model, first, temperature=0.7)):
            torch.testing.assert_close(ours, trainer, atol=1e-4, rtol=0)
        if top_k:  # every sampled token is among the 5 most likely under the trainer's forward
            padded = first.to_padded(pad_id=0)
            with torch.no_grad():
                logits_B_T_V = model(padded.input_ids_B_T, attention_mask=padded.attention_mask_B_T).logits
            top_B_T_K = logits_B_T_V[:, :-1].topk(5, dim=-1).indices
            sampled_B_T = padded.input_ids_B_T[:, 1:]
            inside_B_T = (top_B_T_K == sampled_B_T[..., None]).any(-1)
            assert inside_B_T[padded.loss_mask_B_T[:, 1:]].all()


def test_stop_strings_cut_where_the_native_engine_does(engine, char_tokenizer):
    model = build()
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0)
    free = ENGINES["native"].generate(model, PROMPTS[:1], greedy, n=1).completion_ids[0]
    # the string of the 3rd and 4th tokens: the completion must end at the 4th
    stop = char_tokenizer.decode(free[2:4])
    params = SamplingParams(max_new_tokens=10, temperature=0.0, stop_strings=(stop,))
    ours = engine.generate(model, PROMPTS[:1], params, n=1, tokenizer=char_tokenizer)
    native = ENGINES["native"].generate(model, PROMPTS[:1], params, n=1, tokenizer=char_tokenizer)
    assert ours.completion_ids == native.completion_ids
    assert len(ours.completion_ids[0]) <= 4 and ours.finish_reasons == ["stop"]


def test_an_update_is_pushed_and_verified_and_a_stale_engine_is_caught(engine, monkeypatch):
    model = build()
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    engine.generate(model, PROMPTS, greedy, n=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    # generate sees the in-place change and pushes before sampling
    assert engine.generate(model, PROMPTS, greedy, n=1).completion_ids == \
        ENGINES["native"].generate(model, PROMPTS, greedy, n=1).completion_ids  # fmt: skip
    metrics = engine.sync_weights(model)
    assert metrics["sync/probe_logp_gap"] < 1e-4
    # an engine that does not take the weights: the check after the push raises
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    monkeypatch.setattr(engine.llm, "collective_rpc", lambda *args, **kwargs: [None])
    with pytest.raises(WeightSyncError, match="does not hold the trainer's weights"):
        engine.sync_weights(model)


def test_a_lora_policy_samples_with_its_adapters_merged(engine):
    model = build()
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    policy = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    torch.manual_seed(5)
    with torch.no_grad():  # peft starts B at 0 (delta 0); a trained adapter has moved it
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn_like(p))
    weights = checkpoint_weights(policy)
    assert set(weights) == set(base_before)  # the checkpoint's names, no adapter tensors
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0)
    ours = engine.generate(policy, PROMPTS, greedy, n=1)
    native = ENGINES["native"].generate(policy, PROMPTS, greedy, n=1)
    assert ours.completion_ids == native.completion_ids
    assert engine.last_gap < 1e-4
    base_free = ENGINES["native"].generate(build(), PROMPTS, greedy, n=1)
    assert ours.completion_ids != base_free.completion_ids  # the adapters changed what is sampled
    for name, tensor in policy.get_base_model().state_dict().items():  # the base is untouched by the merge
        key = name.replace(".base_layer", "")
        if "lora_" not in name and key in base_before:
            torch.testing.assert_close(tensor, base_before[key], atol=0, rtol=0)


def test_sleep_and_wake_calls_leave_sampling_unchanged():
    model = build()
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    sleepy = VLLMEngine(sleep_level=1)  # the CPU build accepts sleep and wake_up and keeps its memory
    ours = sleepy.generate(model, PROMPTS, greedy, n=1)
    assert sleepy.asleep
    assert ours.completion_ids == ENGINES["native"].generate(model, PROMPTS, greedy, n=1).completion_ids
    sleepy.close()


def digits(completions, **kwargs) -> list[float]:
    """A reward that differs within a group of an untrained model's samples, so that every step updates."""
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


def grpo_config(out: Path) -> dict:
    return {
        "model": {"preset": "qwen2-small", "tokenizer": "arithmetic"},
        "data": {"task": {"name": "arithmetic", "digits": 1, "operators": "+-", "train_size": 64, "eval_size": 8},
                 "max_length": 16},
        "train": {"max_steps": 3, "lr": 3e-3},
        "eval": {"max_new_tokens": 4, "limit": 4},
        "rl": {"engine": "vllm", "prompts_per_step": 4, "group_size": 4, "sampling": {"max_new_tokens": 6}},
        "output_dir": str(out),
        "seed": 0,
    }  # fmt: skip


def test_a_short_grpo_run_through_vllm_verifies_every_sync(tmp_path: Path):
    history = rl(grpo_config(tmp_path), rewards=[digits], progress=False).history
    assert len(history) == 3
    assert all(step["grad_norm"] > 0 for step in history)  # the weights moved at every step
    for step in history:
        assert step["sync/probe_logp_gap"] < 1e-3
        # the sampler's log-probs are the updated policy's: the trainer's recomputation of them agrees
        assert step["sampler_logp_gap"] < 1e-3


def test_a_grpo_run_whose_engine_drops_the_updates_stops_at_the_check(tmp_path: Path, monkeypatch):
    original = VLLMEngine.push

    def push_at_build_only(self, model):  # later pushes are lost, as with weights that never reach the loader
        if self.pushed is None:
            original(self, model)
        else:
            self.pushed = weights_version(model)

    monkeypatch.setattr(VLLMEngine, "push", push_at_build_only)
    with pytest.raises(WeightSyncError, match="does not hold the trainer's weights"):
        rl(grpo_config(tmp_path), rewards=[digits], progress=False)
