"""The reference engine: transformers' `model.generate`, returning the same `Rollouts` as the native one.

It is the yardstick the native engine is tested against, not the fast path. Prompts are left-padded,
`num_return_sequences=n` makes each prompt's n completions contiguous, and the raw per-step logits
(`output_logits=True`, before any logits processor) give the log-probs with the same convention as the
native engine: log_softmax(logits / T)[token] before top-k / top-p / min-p (T = 1 when greedy).

`generate` draws from the global RNG; for reproducibility a seed is drawn from `generator` and set in a
forked RNG state, so a seeded call is repeatable (though not the same draws as the native engine).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import GenerationConfig

from posttrain.rollout.engine import FinishReason, Rollouts, SamplingParams, StopChecker
from posttrain.rollout.native import left_pad
from posttrain.rollout.sampling import gather_logprobs, scale_logits


def build_generation_config(params: SamplingParams, n: int, pad_id: int) -> GenerationConfig:
    """A GenerationConfig that sets every field our SamplingParams covers (so no model default leaks in)."""
    sampling = (
        {}
        if params.greedy
        else {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,  # 0 must be explicit: transformers' default is 50
            "min_p": params.min_p if params.min_p > 0.0 else None,
        }
    )
    return GenerationConfig(
        do_sample=not params.greedy,
        max_new_tokens=params.max_new_tokens,
        min_new_tokens=0,
        num_return_sequences=n,
        # [] (not None) so the model's own eos does not fill in: we stop only where params say
        eos_token_id=list(params.stop_token_ids),
        pad_token_id=pad_id,
        stop_strings=list(params.stop_strings) or None,
        output_logits=True,
        return_dict_in_generate=True,
        **sampling,
    )


@contextmanager
def seeded_rng(device: torch.device, generator: torch.Generator | None) -> Iterator[None]:
    """Seed the global RNG from `generator` inside a forked RNG state; leave it alone when None."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


class HFEngine:
    """`model.generate` behind the `Engine` protocol."""

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
        """Sample `n` completions per prompt with `model.generate`. Returns Rollouts with group_size n."""
        if params.greedy and n > 1:  # generate refuses greedy with n > 1; the copies are identical anyway
            return self.generate(model, prompt_ids, params, n=1, tokenizer=tokenizer).repeat_groups(n)
        stop = StopChecker(params, tokenizer)
        device = model.device
        input_ids_P_T, attention_mask_P_T = left_pad(prompt_ids, device)
        config = build_generation_config(params, n, pad_id=0)
        with seeded_rng(device, generator):
            out = model.generate(
                input_ids=input_ids_P_T,
                attention_mask=attention_mask_P_T,
                generation_config=config,
                tokenizer=tokenizer,
            )
        generated_B_S = out.sequences[:, input_ids_P_T.shape[1] :]
        logits_B_S_V = torch.stack(out.logits, dim=1)
        scaled_B_S_V = scale_logits(logits_B_S_V, params.temperature)
        num_rows, num_steps = generated_B_S.shape
        logp_B_S = gather_logprobs(scaled_B_S_V.flatten(0, 1), generated_B_S.flatten()).view(
            num_rows, num_steps
        )

        completions, logprobs, finish_reasons = [], [], []
        for b, row in enumerate(generated_B_S.tolist()):
            end = stop.first_stop(row)
            reason: FinishReason = "length" if end is None else "stop"
            length = num_steps if end is None else end + 1
            completions.append(row[:length])
            logprobs.append(logp_B_S[b, :length].clone())
            finish_reasons.append(reason)
        return Rollouts(
            prompt_ids=[list(p) for p in prompt_ids],
            completion_ids=completions,
            logprobs=logprobs,
            finish_reasons=finish_reasons,
            group_size=n,
        )
