"""RMSNorm as one autograd function against PyTorch's composite `rms_norm`, in the training forward (issue #7).

Forward + backward of `token_logprobs` (the unpadded training forward) on the batches the trainers build,
with `decoder_layer.norm_op` making the `RMSNorm` function (posttrain's) or calling `F.rms_norm` (PyTorch's),
alternating in one process; prints each side's median and their ratio. The batches are `unpadded_forward.py`'s
(SFT, packed SFT, DPO) and a GRPO-like one: 8 prompts x 8 completions of 12 numbers.

    python bench/rms_norm.py --sizes tiny,30m --rounds 20
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
from unpadded_forward import alternating_medians, batches


def composite_norm_op(module: Any, norm: Any) -> Any:
    """`decoder_layer.norm_op` with PyTorch's `rms_norm` (autograd through its composite) for float32 input."""
    import torch
    import torch.nn.functional as F

    shape, weight, eps = module.weight.shape, module.weight + norm.offset, getattr(module, norm.eps)
    return lambda x: F.rms_norm(x, shape, weight, eps) if x.dtype == torch.float32 else module(x)


def set_norm_op(op: Any) -> None:
    """Make every norm of the training forward through `op` (the layers' and the final one)."""
    from posttrain.policies import decoder_layer, unpadded

    decoder_layer.norm_op = unpadded.norm_op = op


def grpo_batch(tokenizer: Any) -> Any:
    from posttrain.data import SFTExample, collate_sft, encode_sft

    rng = random.Random(0)
    rows = harness.arithmetic_rows(8, seed=0)
    examples = [
        SFTExample(r["prompt"], " ".join(str(rng.randint(0, 99)) for _ in range(12)), f"row {i}")
        for i, r in enumerate(rows)
        for _ in range(8)
    ]
    return collate_sft(encode_sft(examples, tokenizer), pad_id=tokenizer.pad_token_id)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,30m")
    p.add_argument("--rounds", type=int, default=20, help="timed forward + backward per side, alternating")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch

    from posttrain.policies import decoder_layer

    torch.set_num_threads(args.threads)
    sides = {"function": decoder_layer.norm_op, "composite": composite_norm_op}
    tokenizer = harness.build_tokenizer()
    print(f"threads {args.threads}, {args.rounds} rounds; median CPU seconds per forward + backward")
    for size in [s.strip() for s in args.sizes.split(",")]:
        model = harness.build_model(size, tokenizer).train()
        for name, batch in {**batches(tokenizer, 64, 128, seed=0), "grpo": grpo_batch(tokenizer)}.items():
            medians = alternating_medians(model, batch, sides, set_norm_op, args.rounds)
            set_norm_op(sides["function"])
            ours, composite = medians["function"], medians["composite"]
            shape = "x".join(map(str, batch.input_ids_B_T.shape))
            print(f"{size:>5} {name:<11} [{shape}]: function {ours * 1e3:7.1f} ms, composite {composite * 1e3:7.1f} "
                  f"ms, speed-up {composite / ours:.3f}x")  # fmt: skip


if __name__ == "__main__":
    main()
