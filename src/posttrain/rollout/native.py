"""The native engine: our own batched sampler over a Hugging Face causal LM's forward and KV cache.

Design (DESIGN.md, "Performance principles"):

1. Shared-prompt prefill. The P prompts are left-padded into one [P, T] batch and run through the model
   ONCE, with a mask that hides the padding and position ids that count real tokens only
   (`cumsum(mask) - 1`), so a padded prompt sees exactly what it would see alone. Only the last
   position's logits are computed.
2. Cache expansion. The prefilled KV cache, the mask, the next position ids and the last logits are
   repeated G times along the batch (`repeat_interleave`, so a prompt's G rows are contiguous). A group
   of G completions costs one prompt prefill, not G.
3. Decode with batch shrinking. Each step samples one token for every active row and feeds those tokens
   back. Rows that finish (stop token, stop string, or max_new_tokens) leave the decode batch: the cache
   rows, mask rows and positions of the still-active rows are selected, so later steps compute only what
   is still running. Finishing is checked on the host once per step (one small device-to-host copy of
   the sampled tokens, as `generate` does for its own stopping test).
4. The incremental forward (`posttrain.rollout.decoders`): for every family with an adapter
   (`policies/families/`) the layer forward training shares, over a KV cache preallocated for the whole
   generation, which skips what the model's generic forward redoes at every step (mask building, cache
   concatenation, module dispatch); for any other model, the model's own forward with a `DynamicCache`. Tests
   hold the two equal.

Everything runs under `torch.inference_mode` on the model's device (no CPU-only calls), so the engine
works on CUDA; a CUDA generator must then be passed for seeded sampling. With POSTTRAIN_CUDA_GRAPHS=1 a CUDA
model's decode step is a captured CUDA graph (`decoders.GraphedDecoder`; not yet measured on a GPU).
Greedy decoding with n > 1 decodes each prompt once and copies the result n times (the copies would
be identical).

Log-prob convention (see `posttrain.rollout.sampling`): each completion token carries
log_softmax(logits / T)[token] of the distribution BEFORE top-k / top-p / min-p filtering (T = 1 when
greedy), in float32 - what a fresh forward pass of prompt + completion gives, and what PPO-style losses
use as old log-probs.
"""

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from posttrain.policies import Reference
from posttrain.rollout.decoders import Decoder, build_decoder, positions_from_mask
from posttrain.rollout.engine import FinishReason, Rollouts, SamplingParams, StopChecker
from posttrain.rollout.sampling import sample_tokens

__all__ = [
    "GeometricMixture", "NativeEngine", "decode", "generate_geometric_mixture", "left_pad", "positions_from_mask",
]  # fmt: skip


def left_pad(prompt_ids: list[list[int]], device: torch.device, pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Left-pad prompts into input_ids_P_T (int64) and attention_mask_P_T (int64 0/1) on `device`."""
    width = max(len(p) for p in prompt_ids)
    input_ids_P_T = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask_P_T = torch.zeros(len(prompt_ids), width, dtype=torch.long)
    for i, prompt in enumerate(prompt_ids):
        input_ids_P_T[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask_P_T[i, width - len(prompt) :] = 1
    return input_ids_P_T.to(device), attention_mask_P_T.to(device)


class NativeEngine:
    """Batched KV-cache sampler with shared-prompt prefill and finished rows leaving the batch."""

    def decoder(self, model: Any, max_new_tokens: int) -> Decoder:
        """The incremental forward: a static KV cache for a family with an adapter, the model's own forward
        otherwise."""
        return build_decoder(model, max_new_tokens)

    @torch.inference_mode()
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
        """Sample `n` completions per prompt; see the module docstring. Returns Rollouts with group_size n."""
        if params.greedy and n > 1:  # the n greedy samples of a prompt are identical: decode one
            return self.generate(model, prompt_ids, params, n=1, tokenizer=tokenizer).repeat_groups(n)
        decoder = self.decoder(model, params.max_new_tokens)
        return decode(
            [decoder], lambda logits: logits[0], prompt_ids, params,
            n=n, device=model.device, generator=generator, tokenizer=tokenizer,
        )  # fmt: skip


class DecoderWithin:
    """A decoder whose every call runs inside `context()`: a LoRA policy's reference decodes with the policy's own
    weights, its adapters switched off for the call (`policies.AdapterOff`)."""

    def __init__(self, decoder: Decoder, context: Callable[[], Any]) -> None:
        self.decoder, self.context = decoder, context

    def prefill(self, input_ids_P_T: Tensor, attention_mask_P_T: Tensor) -> Tensor:
        with self.context():
            return self.decoder.prefill(input_ids_P_T, attention_mask_P_T)

    def expand(self, n: int) -> None:
        self.decoder.expand(n)

    def select(self, keep_A: Tensor) -> None:
        self.decoder.select(keep_A)

    def step(self, tokens_A: Tensor) -> Tensor:
        with self.context():
            return self.decoder.step(tokens_A)


@torch.inference_mode()
def generate_geometric_mixture(
    policy: Any,
    reference: Reference,
    prompt_ids: list[list[int]],
    params: SamplingParams,
    *,
    n: int,
    mixture_coef: float,
    generator: torch.Generator | None = None,
    tokenizer: Any = None,
) -> Rollouts:
    """Sample n completions per prompt from Nash-MD's regularised policy, token by token
    (Munos et al. 2023, arXiv:2312.00886; the GeometricMixtureWrapper TRL had before 1.16):

        log pi_mix(y_t | x, y_<t) = (1 - m) log pi(y_t | ...) + m log ref(y_t | ...) + const,   m = mixture_coef

    then temperature and filters as `params` say. Both models decode over their own KV cache, with the
    shared-prompt prefill and shrinking batch of `NativeEngine.generate`. `logprobs` are the mixture's."""
    # the decoders read the modules at each call: a LoRA policy and its adapter-off reference share weights
    decoders = [build_decoder(policy, params.max_new_tokens),
                DecoderWithin(build_decoder(reference.model, params.max_new_tokens), reference.active)]  # fmt: skip

    def mix(logits: list[Tensor]) -> Tensor:
        policy_A_V, reference_A_V = (x.float().log_softmax(dim=-1) for x in logits)
        return (1 - mixture_coef) * policy_A_V + mixture_coef * reference_A_V

    device = policy.device
    return decode(decoders, mix, prompt_ids, params, n=n, device=device, generator=generator, tokenizer=tokenizer)


class GeometricMixture:
    """An engine that samples Nash-MD's regularised policy: `generate(policy, ...)` draws from
    pi^(1 - m) * ref^m token by token (`generate_geometric_mixture`), so that mixture opponents are sampled
    through the same episode path as every other sample."""

    def __init__(self, reference: Reference, mixture_coef: float) -> None:
        self.reference, self.mixture_coef = reference, mixture_coef

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
        return generate_geometric_mixture(model, self.reference, prompt_ids, params, n=n,
                                          mixture_coef=self.mixture_coef, generator=generator, tokenizer=tokenizer)


def decode(
    decoders: list[Decoder],
    combine: Callable[[list[Tensor]], Tensor],
    prompt_ids: list[list[int]],
    params: SamplingParams,
    *,
    n: int,
    device: torch.device,
    generator: torch.Generator | None,
    tokenizer: Any,
) -> Rollouts:
    """The sampling loop shared by every native sampler: prefill each decoder once, expand to n rows per
    prompt, then sample from `combine(each decoder's logits_A_V)` and feed the tokens to every decoder,
    dropping finished rows from all of them."""
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("native sampling: every prompt needs at least one token")
    stop = StopChecker(params, tokenizer)
    padded = left_pad(prompt_ids, device)
    logits = [d.prefill(*padded).repeat_interleave(n, dim=0) for d in decoders]
    for d in decoders:
        d.expand(n)
    num_rows = len(prompt_ids) * n
    rows = list(range(num_rows))  # which completion each active row is (host copy of rows_A)
    rows_A = torch.arange(num_rows, device=device)
    logp_B_S = torch.zeros(num_rows, params.max_new_tokens, dtype=torch.float32, device=device)
    completions: list[list[int]] = [[] for _ in range(num_rows)]
    finish_reasons: list[FinishReason] = ["length"] * num_rows

    for step in range(params.max_new_tokens):
        tokens_A, logp_A = sample_tokens(combine(logits), params, generator)
        logp_B_S[rows_A, step] = logp_A
        keep = []
        for a, (row, token) in enumerate(zip(rows, tokens_A.tolist())):
            completions[row].append(token)
            if stop.is_stop(completions[row]):
                finish_reasons[row] = "stop"
            else:
                keep.append(a)
        if not keep or step + 1 == params.max_new_tokens:
            break
        if len(keep) < len(rows):
            rows = [rows[a] for a in keep]
            keep_A = torch.tensor(keep, device=device)
            for d in decoders:
                d.select(keep_A)
            rows_A, tokens_A = rows_A[keep_A], tokens_A[keep_A]
        logits = [d.step(tokens_A) for d in decoders]

    logprobs = [logp_B_S[i, : len(c)].clone() for i, c in enumerate(completions)]
    return Rollouts([list(p) for p in prompt_ids], completions, logprobs, finish_reasons, group_size=n)
