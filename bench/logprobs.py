"""Per-token log-probs of long sequences with a 150k vocabulary: chunked against naive (issue #7).

A Qwen2-shaped model (the size's preset) with Qwen2's 151,936-token vocabulary, B sequences of T tokens, the
last 3/4 of each sequence as targets; one forward and one backward of the summed target log-probs.

- chunked: `posttrain.policies.token_logprobs`, the LM head run over vocabulary chunks with an online
  log-sum-exp, only at target positions, recomputed in the backward (never a [B, T, V] float32 tensor);
- naive: `model(...).logits.float().log_softmax(-1).gather(...)`, the straightforward way, which
  materialises [B, T, V] logits, their log-softmax and both gradients;
- trl-fused (reported beside them): TRL's `add_fused_lm_head` head, which on CPU scores every position.

Peak memory is each side's own process peak RSS (CPU).

    python bench/logprobs.py --seq 2048
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

VOCAB = 151_936  # Qwen2's vocabulary


def _setup(case: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from posttrain.policies.models import preset_config

    config = preset_config(harness.SIZES[case["size"]], vocab_size=VOCAB, max_positions=max(2048, case["seq"]))
    torch.manual_seed(case["seed"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(case["device"]).train()
    generator = torch.Generator().manual_seed(case["seed"])
    ids_B_T = torch.randint(0, VOCAB, (case["batch"], case["seq"]), generator=generator).to(case["device"])
    attention_mask_B_T = torch.ones_like(ids_B_T, dtype=torch.bool)
    target_mask_B_T = torch.zeros_like(attention_mask_B_T)
    target_mask_B_T[:, case["seq"] // 4 :] = True
    return model, ids_B_T, attention_mask_B_T, target_mask_B_T


def _timed(case: dict[str, Any], step: Any, model: Any) -> dict[str, Any]:
    import torch

    base = harness.base_memory_mb(case["device"])
    values, cpu_values = [], []
    for i in range(case["warmup"] + case["steps"]):
        started, started_cpu = time.perf_counter(), time.process_time()
        step()
        model.zero_grad(set_to_none=True)
        if case["device"].startswith("cuda"):
            torch.cuda.synchronize()
        if i >= case["warmup"]:
            values.append(time.perf_counter() - started)
            cpu_values.append(time.process_time() - started_cpu)
    return {"values": values, "cpu_values": cpu_values, "base_mb": base}


def run_chunked(case: dict[str, Any]) -> dict[str, Any]:
    from posttrain.policies import token_logprobs

    model, ids_B_T, attention_mask_B_T, target_mask_B_T = _setup(case)

    def step() -> None:
        logp_B_T, _ = token_logprobs(model, ids_B_T, attention_mask_B_T, target_mask_B_T)
        logp_B_T.sum().backward()

    return _timed(case, step, model)


def run_naive(case: dict[str, Any]) -> dict[str, Any]:
    model, ids_B_T, attention_mask_B_T, target_mask_B_T = _setup(case)

    def step() -> None:
        logits_B_T_V = model(input_ids=ids_B_T, attention_mask=attention_mask_B_T.long()).logits
        logp_B_T = logits_B_T_V[:, :-1].float().log_softmax(-1).gather(-1, ids_B_T[:, 1:, None]).squeeze(-1)
        (logp_B_T * target_mask_B_T[:, 1:]).sum().backward()

    return _timed(case, step, model)


def run_trl_fused(case: dict[str, Any]) -> dict[str, Any]:
    from trl.trainer.utils import add_fused_lm_head

    model, ids_B_T, attention_mask_B_T, target_mask_B_T = _setup(case)
    add_fused_lm_head(model)
    labels_B_T = ids_B_T.masked_fill(~target_mask_B_T, -100)

    def step() -> None:
        out = model(input_ids=ids_B_T, attention_mask=attention_mask_B_T.long(), labels=labels_B_T, fused_lm_head=True)
        out.log_probs.sum().backward()

    return _timed(case, step, model)


SIDES = {"chunked": run_chunked, "naive": run_naive, "trl-fused": run_trl_fused}


def main() -> None:
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1, help="sequences (B)")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence (T)")
    p.add_argument("--no-trl", action="store_true", help="leave out TRL's fused head")
    args = p.parse_args()
    if args.worker:
        return harness.worker_main(args.worker, SIDES)
    rounds = 1 if args.quick else args.rounds
    cases = []
    for size in harness.sizes_of(args):
        case = {
            "size": size, "batch": args.batch, "seq": 256 if args.quick else args.seq, "steps": args.steps or 2,
            "warmup": args.warmup, "device": args.device, "seed": 0,
        }  # fmt: skip
        print(f"Log-probs, {size}, V={VOCAB}: {case}", flush=True)
        names = ["chunked", "naive"] + ([] if args.no_trl else ["trl-fused"])
        sides = harness.alternate(__file__, case, names, rounds=rounds, threads=args.threads)
        chunked, naive = sides["chunked"], sides["naive"]
        notes = [f"B={case['batch']} x T={case['seq']}, V={VOCAB:,}; peak RSS chunked {chunked.peak_mb:,.0f} MB "
                 f"(+{chunked.peak_mb - chunked.base_mb:,.0f} over the model), naive "
                 f"{naive.peak_mb:,.0f} MB (+{naive.peak_mb - naive.base_mb:,.0f})"]  # fmt: skip
        if "trl-fused" in sides:
            fused = sides["trl-fused"]
            notes.append(f"TRL fused head: {fused.median:.2f} s, peak {fused.peak_mb:,.0f} MB "
                         f"(+{fused.peak_mb - fused.base_mb:,.0f})")  # fmt: skip
        cases.append(harness.CaseResult("Log-probs fwd+bwd, V=152k", size, case, "s", sides, baseline="naive",
                                        ours="chunked", notes=notes))  # fmt: skip
    harness.print_cases(cases)
    print(f"wrote {harness.write_json(args.json, __file__, cases)}")


if __name__ == "__main__":
    main()
