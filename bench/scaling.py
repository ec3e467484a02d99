"""Scaling of the GRPO step: time per step as the completion length doubles (64, 128, 256, 512) and as the
group size doubles, posttrain against TRL (issue #7). Every point is a `bench/grpo_step.py` case (same
model, prompts, reward and settings on both sides); only L or G changes.

    python bench/scaling.py --sizes tiny
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_step
import harness


def main() -> None:
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8, help="group size while the length varies")
    p.add_argument("--completion", type=int, default=32, help="completion length while the group varies")
    p.add_argument("--lengths", default="64,128,256,512")
    p.add_argument("--groups", default="4,8,16,32")
    p.add_argument("--beta", type=float, default=0.04)
    args = p.parse_args()
    if args.worker:
        raise SystemExit("scaling.py runs bench/grpo_step.py workers; it has none of its own")
    rounds = 1 if args.quick else args.rounds
    steps = 1 if args.quick else args.steps or 2
    lengths = [int(x) for x in args.lengths.split(",")][: 2 if args.quick else None]
    groups = [int(x) for x in args.groups.split(",")][: 2 if args.quick else None]
    script = grpo_step.__file__
    cases = []
    for size in harness.sizes_of(args):
        points = [("completion length", {"completion": n, "group": args.group}) for n in lengths]
        points += [("group size", {"completion": args.completion, "group": g}) for g in groups]
        for axis, change in points:
            case = grpo_step.grpo_case(size, prompts=args.prompts, beta=args.beta, steps=steps, warmup=args.warmup,
                                       device=args.device, **change)  # fmt: skip
            label = f"GRPO step, L={change['completion']}, G={change['group']}"
            print(f"{label} ({axis}), {size}", flush=True)
            sides = harness.alternate(script, case, ["posttrain", "trl"], rounds=rounds, threads=args.threads)
            tokens = {s: sides[s].extra["completion_tokens"] for s in sides}
            note = f"varies {axis}; completion tokens per step: posttrain {tokens['posttrain']:.0f}, "
            note += f"TRL {tokens['trl']:.0f}"
            cases.append(harness.CaseResult(label, size, case, "s", sides, notes=[note]))
    harness.print_cases(cases)
    print(f"wrote {harness.write_json(args.json, __file__, cases)}")


if __name__ == "__main__":
    main()
