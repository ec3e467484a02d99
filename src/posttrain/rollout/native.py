"""The native engine: our own batched sampler over a Hugging Face causal LM's forward and KV cache.

Design (DESIGN.md, "Performance principles"):

1. Shared-prompt prefill. The P prompts are left-padded into one [P, T] batch and run through the model
   ONCE, with a 2-D attention mask that hides the padding and position ids that count real tokens only
   (`cumsum(mask) - 1`), so a padded prompt sees exactly what it would see alone. Only the last
   position's logits are computed (`logits_to_keep=1`).
2. Cache expansion. The prefilled `DynamicCache`, the attention mask, the next position ids and the last
   logits are repeated G times along the batch (`repeat_interleave`, so a prompt's G rows are
   contiguous). A group of G completions costs one prompt prefill, not G.
3. Decode with batch shrinking. Each step samples one token for every active row and feeds those tokens
   back. Rows that finish (stop token, stop string, or max_new_tokens) leave the decode batch: the cache
   rows, mask rows and positions of the still-active rows are selected (`Cache.batch_select_indices`),
   so later steps compute only what is still running. Finishing is checked on the host once per step
   (one small device-to-host copy of the sampled tokens, as `generate` does for its own stopping test).

Everything runs under `torch.inference_mode` on the model's device (no CPU-only calls), so the engine
works on CUDA; a CUDA generator must then be passed for seeded sampling. CUDA graphs come later.
Greedy decoding with n > 1 decodes each prompt once and copies the result n times (the copies would
be identical).

Log-prob convention (see `posttrain.rollout.sampling`): each completion token carries
log_softmax(logits / T)[token] of the distribution BEFORE top-k / top-p / min-p filtering (T = 1 when
greedy), in float32 - what a fresh forward pass of prompt + completion gives, and what PPO-style losses
use as old log-probs.
"""

from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache

from posttrain.rollout.engine import FinishReason, Rollouts, SamplingParams, StopChecker
from posttrain.rollout.sampling import sample_tokens


def left_pad(prompt_ids: list[list[int]], device: torch.device, pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Left-pad prompts into input_ids_P_T (int64) and attention_mask_P_T (int64 0/1) on `device`."""
    width = max(len(p) for p in prompt_ids)
    input_ids_P_T = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask_P_T = torch.zeros(len(prompt_ids), width, dtype=torch.long)
    for i, prompt in enumerate(prompt_ids):
        input_ids_P_T[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask_P_T[i, width - len(prompt) :] = 1
    return input_ids_P_T.to(device), attention_mask_P_T.to(device)


def positions_from_mask(attention_mask_B_T: Tensor) -> Tensor:
    """Position ids under left padding: real tokens count 0, 1, 2, ...; padding gets 0. [B, T] -> [B, T]."""
    return (attention_mask_B_T.cumsum(dim=-1) - 1).clamp(min=0)


def prefill(model: Any, input_ids_P_T: Tensor, attention_mask_P_T: Tensor) -> tuple[DynamicCache, Tensor]:
    """Run the prompts once. Returns the filled cache and the last position's logits_P_V (float32)."""
    cache = DynamicCache(config=model.config)
    out = model(
        input_ids=input_ids_P_T,
        attention_mask=attention_mask_P_T,
        position_ids=positions_from_mask(attention_mask_P_T),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.past_key_values, out.logits[:, -1].float()


def decode_step(
    model: Any, cache: DynamicCache, tokens_A: Tensor, attention_mask_A_T: Tensor, positions_A: Tensor
) -> Tensor:
    """Feed one token per active row (A rows); the mask already includes it. Returns logits_A_V (float32)."""
    out = model(
        input_ids=tokens_A[:, None],
        attention_mask=attention_mask_A_T,
        position_ids=positions_A[:, None],
        past_key_values=cache,
        use_cache=True,
    )
    return out.logits[:, -1].float()


class NativeEngine:
    """Batched KV-cache sampler with shared-prompt prefill and finished rows leaving the batch."""

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
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("NativeEngine.generate: every prompt needs at least one token")
        if params.greedy and n > 1:  # the n greedy samples of a prompt are identical: decode one
            return self.generate(model, prompt_ids, params, n=1, tokenizer=tokenizer).repeat_groups(n)
        stop = StopChecker(params, tokenizer)
        device = model.device
        input_ids_P_T, attention_mask_P_T = left_pad(prompt_ids, device)
        cache, logits_P_V = prefill(model, input_ids_P_T, attention_mask_P_T)

        cache.batch_repeat_interleave(n)
        logits_A_V = logits_P_V.repeat_interleave(n, dim=0)
        attention_mask_A_T = attention_mask_P_T.repeat_interleave(n, dim=0)
        positions_A = attention_mask_A_T.sum(dim=-1)  # next position = number of real prompt tokens
        num_rows = len(prompt_ids) * n
        rows = list(range(num_rows))  # which completion each active row is (host copy of rows_A)
        rows_A = torch.arange(num_rows, device=device)
        logp_B_S = torch.zeros(num_rows, params.max_new_tokens, dtype=torch.float32, device=device)
        completions: list[list[int]] = [[] for _ in range(num_rows)]
        finish_reasons: list[FinishReason] = ["length"] * num_rows

        for step in range(params.max_new_tokens):
            tokens_A, logp_A = sample_tokens(logits_A_V, params, generator)
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
                cache.batch_select_indices(keep_A)
                rows_A, tokens_A = rows_A[keep_A], tokens_A[keep_A]
                attention_mask_A_T, positions_A = attention_mask_A_T[keep_A], positions_A[keep_A]
            attention_mask_A_T = torch.cat(
                [attention_mask_A_T, attention_mask_A_T.new_ones(len(keep), 1)], dim=-1
            )
            logits_A_V = decode_step(model, cache, tokens_A, attention_mask_A_T, positions_A)
            positions_A = positions_A + 1

        logprobs = [logp_B_S[i, : len(c)].clone() for i, c in enumerate(completions)]
        return Rollouts(
            prompt_ids=[list(p) for p in prompt_ids],
            completion_ids=completions,
            logprobs=logprobs,
            finish_reasons=finish_reasons,
            group_size=n,
        )
