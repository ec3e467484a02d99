"""The training forward's attention kernel for short documents against PyTorch's fused one, in one process.

`kernels.causal_attention` computes float32 CPU rows of at most 64 positions by two batched products with the
causal mask as a bias (each key/value head's query heads stacked, rows shorter than 16 positions given 16 keys so
that the softmax runs on full vectors); PyTorch's `scaled_dot_product_attention` is the alternative. This times
forward + backward of both on the layouts the unpadded forward builds ([S, N, T, D] views of [S, T, N, D], the
demo model's 4 query heads sharing 2 key/value heads of 32 features), alternating, and also the batched
products without the 16-key padding; prints each side's median process CPU time (steadier than wall time on a
shared machine) and the ratios.

    python bench/attention.py --rounds 30
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--docs", type=int, default=64, help="documents S (a GRPO step's 64 sequences)")
    args = p.parse_args()

    import torch
    import torch.nn.functional as F

    from posttrain.policies import kernels

    torch.set_num_threads(args.threads)

    def fused(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.18, enable_gqa=True)

    def ours(q, k, v):
        return kernels.causal_attention(q, k, v, 0.18)

    def unpadded_softmax(q, k, v):
        width = q.shape[2]
        bias = kernels.causal_bias(width, width, None, q).repeat(q.shape[1] // k.shape[1], 1)
        return kernels.grouped_attention(q, k, v, bias, 0.18)

    sides = {"fused": fused, "batched products": ours, "batched, no key padding": unpadded_softmax}
    print(f"threads {args.threads}, {args.docs} documents x 4 heads (2 key/value) x 32 features, "
          f"{args.rounds} rounds; median CPU time of forward + backward")  # fmt: skip
    for width in (10, 24, 40, 48, 56, 64):
        gen = torch.Generator().manual_seed(width)
        q, k, v = (torch.randn(args.docs, width, n, 32, generator=gen).transpose(1, 2) for n in (4, 2, 2))
        grad = torch.randn(args.docs, 4, width, 32, generator=gen)
        times: dict[str, list[float]] = {name: [] for name in sides}
        for round_ in range(args.rounds + 2):
            for name in list(sides) if round_ % 2 else list(sides)[::-1]:
                leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                started = time.process_time()
                sides[name](*leaves).backward(grad)
                if round_ >= 2:
                    times[name].append(time.process_time() - started)
        medians = {name: statistics.median(t) for name, t in times.items()}
        line = ", ".join(f"{name} {m * 1e3:.3f} ms" for name, m in medians.items())
        print(f"T={width:>2}: {line}; fused / batched {medians['fused'] / medians['batched products']:.2f}x, "
              f"unpadded / padded keys {medians['batched, no key padding'] / medians['batched products']:.2f}x")


if __name__ == "__main__":
    main()
