"""The unpadded training forward against the padded one, in one process (issue #7).

Forward + backward of `token_logprobs` (the summed target log-probs) with the unpadded forward
(`posttrain.policies.unpadded`) on and off, alternating, on the batches the trainers build:

- sft: B arithmetic demonstrations as `bench/sft.py` draws them, completion-only targets, one micro-batch
  padded to its longest row (`collate_sft`);
- sft-packed: the same demonstrations packed into rows of `--max-length` (`collate_packed`);
- dpo: B/2 arithmetic pairs as `bench/dpo_step.py` draws them, chosen and rejected rows padded together
  (`collate_preference`).

Reports the median CPU seconds of each side and their ratio, and the share of token slots that are padding.

    python bench/unpadded_forward.py --sizes tiny,30m --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
from dpo_step import preference_rows


def batches(tokenizer: Any, size: int, max_length: int, seed: int) -> dict[str, Any]:
    from posttrain.data import (
        PreferenceExample,
        SFTExample,
        collate_packed,
        collate_preference,
        collate_sft,
        encode_preference,
        encode_sft,
        pack_by_length,
    )

    rows = harness.arithmetic_rows(size, seed=seed)
    sft = encode_sft([SFTExample(r["prompt"], r["completion"], f"row {i}") for i, r in enumerate(rows)], tokenizer)
    pairs = preference_rows(size // 2, seed=seed)
    pref = encode_preference(
        [PreferenceExample(r["prompt"], r["chosen"], r["rejected"], f"row {i}") for i, r in enumerate(pairs)],
        tokenizer,
    )
    pad = tokenizer.pad_token_id
    packed = pack_by_length([len(t.input_ids) for t in sft], max_length=max_length)
    return {
        "sft": collate_sft(sorted(sft, key=lambda t: len(t.input_ids)), pad_id=pad),
        "sft-packed": collate_packed(sft, packed, pad_id=pad),
        "dpo": collate_preference(pref, pad_id=pad),
    }


def forward_backward(model: Any, batch: Any) -> float:
    from posttrain.policies import token_logprobs

    started = time.process_time()  # CPU time: steadier than wall time on a shared machine
    logp_B_T, _ = token_logprobs(
        model,
        batch.input_ids_B_T,
        batch.attention_mask_B_T,
        batch.loss_mask_B_T,
        position_ids_B_T=batch.position_ids_B_T,
    )
    logp_B_T.sum().backward()
    model.zero_grad(set_to_none=True)
    return time.process_time() - started


def alternating_medians(
    model: Any, batch: Any, sides: dict[str, Any], install: Callable[[Any], None], rounds: int
) -> dict[str, float]:
    """Median CPU seconds of `forward_backward` for each side, the sides alternating from round to round after one
    warm-up round; `install(value)` puts a side's value in place before its run."""
    times: dict[str, list[float]] = {side: [] for side in sides}
    for round_ in range(rounds + 1):
        for side, value in sides.items() if round_ % 2 else reversed(sides.items()):
            install(value)
            elapsed = forward_backward(model, batch)
            if round_:  # the first round warms up
                times[side].append(elapsed)
    return {side: statistics.median(values) for side, values in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,30m")
    p.add_argument("--batch", type=int, default=64, help="rows per batch (dpo: batch / 2 pairs)")
    p.add_argument("--max-length", type=int, default=128, help="packed row length")
    p.add_argument("--rounds", type=int, default=15, help="timed forward + backward per side, alternating")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch

    import posttrain.policies.logprobs as logprobs_module

    torch.set_num_threads(args.threads)
    runs_unpadded = logprobs_module.runs_unpadded
    sides = {"unpadded": runs_unpadded, "padded": lambda model: False}
    tokenizer = harness.build_tokenizer()
    print(f"threads {args.threads}, batch {args.batch}, {args.rounds} rounds; median seconds per forward + backward")
    for size in [s.strip() for s in args.sizes.split(",")]:
        model = harness.build_model(size, tokenizer).train()
        for name, batch in batches(tokenizer, args.batch, args.max_length, seed=0).items():
            slots = batch.input_ids_B_T.numel()
            padding = 1 - int(batch.attention_mask_B_T.sum()) / slots
            medians = alternating_medians(
                model, batch, sides, lambda check: setattr(logprobs_module, "runs_unpadded", check), args.rounds
            )
            logprobs_module.runs_unpadded = runs_unpadded
            fast, slow = medians["unpadded"], medians["padded"]
            shape = "x".join(map(str, batch.input_ids_B_T.shape))
            print(
                f"{size:>5} {name:<11} [{shape}] padding {padding:4.0%}: unpadded {fast * 1e3:7.1f} ms, "
                f"padded {slow * 1e3:7.1f} ms, speed-up {slow / fast:.2f}x"
            )


if __name__ == "__main__":
    main()
