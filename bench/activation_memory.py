"""Activation memory of a GRPO step's training forward: the bytes autograd keeps for the backward (issue #7).

Peak memory of an RL step on a GPU is the policy's activations, kept from the forward for the backward, and the
logits. What is kept does not depend on the device, so it is counted here on any machine: every tensor that
autograd saves while the forward runs (`torch.autograd.graph.saved_tensors_hooks`), each storage once, the
parameters left out. Sides, on the same model and batch:

- posttrain: `token_logprobs`, as its trainers call it (unpadded forward, the group's prompt computed once,
  `SwiGLUDown` and `HalfRMSNorm`, the head over vocabulary chunks at the completion tokens only);
- posttrain, autograd's ops: the same with the MLP and the norms through autograd's own ops, as before they were
  functions of their own;
- transformers + TRL: the model's forward over the padded group and TRL's `selective_log_softmax` of the
  completion logits, as TRL's GRPO trainer computes the policy's log-probs (needs the `bench` extra).

The batch is one group of the issue's GPU case: G completions of `--completion` tokens sharing a prompt of
`--prompt-tokens`; a step of P prompts keeps P times as much. Transient memory (the logits themselves, the
backward's own buffers) is not counted.

    python bench/activation_memory.py --sizes 30m,0.5b
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
from rms_norm import composite_norm_op


def kept_bytes(model: Any, forward: Any) -> int:
    """Bytes of the distinct non-parameter storages autograd saves for the backward while `forward()` runs."""
    import torch

    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = max(kept.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(kept.values())


def group_batch(vocab: int, group: int, prompt: int, completion: int, seed: int = 0) -> tuple[Any, Any, Any]:
    """One group: G rows of a shared prompt (arithmetic-vocabulary ids) and random completions. ids, mask, targets."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    prompt_T = torch.randint(5, 370, (prompt,), generator=generator)
    ids_G_T = torch.stack([torch.cat([prompt_T, torch.randint(0, vocab, (completion,), generator=generator)])
                           for _ in range(group)])  # fmt: skip
    target_G_T = torch.zeros_like(ids_G_T, dtype=torch.bool)
    target_G_T[:, prompt:] = True
    return ids_G_T, torch.ones_like(target_G_T), target_G_T


def autograd_ops(decoder_layer: Any) -> dict[str, Any]:
    """`decoder_layer`'s MLP and norm makers with autograd's own ops where the functions would apply."""

    def gated_down_op(act_fn: Any, down_proj: Any) -> Any:
        act, down = decoder_layer.activation_op(act_fn), decoder_layer.linear_op(down_proj)
        return lambda gate, up: down(act(gate) * up)

    return {"gated_down_op": gated_down_op, "norm_op": composite_norm_op}


def measure(size: str, dtype: str, group: int, prompt: int, completion: int) -> dict[str, int | None]:
    import torch

    from posttrain.policies import decoder_layer, token_logprobs, unpadded

    tokenizer = harness.build_tokenizer()
    model = harness.build_model(size, tokenizer, dtype=dtype).train()
    ids_G_T, mask_G_T, target_G_T = group_batch(model.config.vocab_size, group, prompt, completion)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    results: dict[str, int | None] = {}
    with autocast:
        results["posttrain"] = kept_bytes(model, lambda: token_logprobs(model, ids_G_T, mask_G_T, target_G_T))
        own = {name: getattr(decoder_layer, name) for name in ("gated_down_op", "norm_op")}
        try:
            for name, op in autograd_ops(decoder_layer).items():
                setattr(decoder_layer, name, op)
            unpadded.norm_op = decoder_layer.norm_op
            results["posttrain, autograd's ops"] = kept_bytes(
                model, lambda: token_logprobs(model, ids_G_T, mask_G_T, target_G_T)
            )
        finally:
            for name, op in own.items():
                setattr(decoder_layer, name, op)
            unpadded.norm_op = decoder_layer.norm_op
        try:
            from trl.trainer.utils import selective_log_softmax
        except ImportError:
            results["transformers + TRL"] = None
        else:

            def trl_forward() -> Any:
                logits = model(input_ids=ids_G_T, attention_mask=mask_G_T.long(), use_cache=False).logits
                return selective_log_softmax(logits[:, prompt - 1 : -1], ids_G_T[:, prompt:])

            results["transformers + TRL"] = kept_bytes(model, trl_forward)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="30m,0.5b")
    p.add_argument("--dtype", default="auto", choices=("auto", *harness.DTYPES),
                   help="auto: bfloat16 for 0.5b (the issue's GPU case), float32 otherwise")  # fmt: skip
    p.add_argument("--prompts", type=int, default=8, help="P: a step keeps P groups' activations")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--completion", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    print(f"One group of {args.group} x ({args.prompt_tokens} prompt + {args.completion} completion tokens); "
          f"a step of {args.prompts} prompts keeps {args.prompts} times as much.\n")  # fmt: skip
    print("| size | dtype | side | kept per group | per sequence token | a step of P prompts |")
    print("|---|---|---|---|---|---|")
    tokens = args.group * (args.prompt_tokens + args.completion)
    for size in [s.strip() for s in args.sizes.split(",")]:
        dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if size == "0.5b" else "float32")
        for side, kept in measure(size, dtype, args.group, args.prompt_tokens, args.completion).items():
            if kept is None:
                print(f"| {size} | {dtype} | {side} | - (TRL not installed) | - | - |")
                continue
            print(f"| {size} | {dtype} | {side} | {kept / 2**20:,.0f} MiB | {kept / tokens / 2**10:,.1f} KiB | "
                  f"{kept * args.prompts / 2**30:,.2f} GiB |")  # fmt: skip


if __name__ == "__main__":
    main()
