"""A tool-using GRPO step: posttrain's calculator environment against TRL's tool loop (`GRPOTrainer(tools=...)`), on
the same model, tokenizer, prompts, tool and reward (issue #23.8).

The model is a warm start that calls the calculator: the demo model's shape (`qwen2-small`, 0.8M parameters) after
a short posttrain SFT on calculator demonstrations of 1-3 digit multiplication (`--sft-steps`), saved once with its
tokenizer (the `arithmetic-tools` tokenizer and its compact ChatML template with Hermes `<tool_call>` blocks) and
loaded by both sides. Both sample P prompts x G episodes at temperature 1: a model turn; its calls run with
`posttrain.envs.builtin_tools.calculator` (the same function on both sides: TRL calls it, posttrain's environment
wraps it); the result is appended as a tool message; one more model turn. At most `--completion` tokens after the
prompt, tool tokens included (TRL's `max_completion_length`; posttrain's `env.max_total_tokens`, each turn at most as
many), one tool round (TRL's `max_tool_calling_iterations=1`; posttrain's `env.max_turns=2`). One reward, the final
message's number against the answer; group-normalised advantages; a k3 KL term to the initial policy (beta); one
epoch, one AdamW step, clip 0.2, grad-norm 1.0, token-mean loss. TRL parses calls with its own Qwen3 response
template (`trl.chat_template_utils.qwen3_template`, which reads Hermes `<tool_call>` JSON; the tokenizer's template
is prefix-preserving, so TRL keeps it); posttrain with its `hermes` parser.

A step is timed end to end (generation, tools, scoring, reference, forward, backward, optimiser, logging), the sides
alternating in fresh processes as every benchmark here (`harness.alternate`).

    python bench/agent_step.py                  # 2 rounds
    python bench/agent_step.py --quick
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

MODEL_DIR = harness.OUT_DIR / "agent_step_model"
TASK = {"digits": 3, "operators": "*"}


def agent_case(*, prompts: int = 8, group: int = 8, completion: int = 48, beta: float = 0.04, steps: int = 4,
               warmup: int = 1, sft_steps: int = 300, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    return {"size": "tiny", "prompts": prompts, "group": group, "completion": completion, "beta": beta, "lr": 1e-5,
            "temperature": 1.0, "steps": steps, "warmup": warmup, "sft_steps": sft_steps, "device": "cpu",
            "dtype": "float32", "seed": seed}  # fmt: skip


def tool_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Conversational prompts (`37*58=` as a user message) and their answers."""
    from posttrain.tasks import ArithmeticTask

    rows = ArithmeticTask(**TASK, tool_fraction=1.0).sample(n, seed=seed)
    return [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows]


def final_answer_reward(prompts: list[Any], completions: list[Any], answer: list[str], **kwargs: Any) -> list[float]:
    """1.0 when the last message's first integer is the answer; TRL's and posttrain's tool loops both pass each
    completion as its messages."""
    from posttrain.tasks import verify

    def text(completion: Any) -> str:
        if isinstance(completion, list) and completion:
            return str(completion[-1].get("content") or "")
        return str(completion)

    return [1.0 if verify(text(c), a) else 0.0 for c, a in zip(completions, answer)]


def prepare(case: dict[str, Any]) -> dict[str, Any]:
    """The warm start both sides load: posttrain SFT on calculator demonstrations, saved with its tokenizer."""
    from posttrain import api
    from posttrain.policies import save_pretrained

    marker = MODEL_DIR / f"sft-{case['sft_steps']}-seed{case['seed']}.done"
    if not marker.exists():
        with tempfile.TemporaryDirectory() as out:
            result = api.sft({"model": {"preset": "qwen2-small", "tokenizer": "arithmetic-tools"},
                              "data": {"task": {"name": "arithmetic", **TASK, "tool_fraction": 1.0, "train_size": 2000,
                                                "eval_size": 50}, "max_length": 96},
                              "train": {"max_steps": case["sft_steps"], "batch_size": 32, "lr": 3e-3,
                                        "warmup_steps": 20},
                              "eval": {"limit": 10}, "output_dir": out, "seed": case["seed"]},
                             progress=False)  # fmt: skip
            save_pretrained(result.model, result.tokenizer, MODEL_DIR)
        marker.write_text("")
    return {"values": [0.0], "base_mb": 0.0}


def run_posttrain(case: dict[str, Any]) -> dict[str, Any]:
    from posttrain import api
    from posttrain.policies import describe_forward_path, load_model, load_tokenizer

    tokenizer, model = load_tokenizer(MODEL_DIR), load_model(MODEL_DIR)
    path = describe_forward_path(model)
    rows = tool_rows(4096, case["seed"])
    base = harness.base_memory_mb()
    clock = harness.StepClock()
    clock.watch_posttrain()
    with tempfile.TemporaryDirectory() as out:
        config = {
            "model": {"path": str(MODEL_DIR)},
            "data": {"max_length": 96},
            "train": {"max_steps": case["warmup"] + case["steps"], "lr": case["lr"], "max_grad_norm": 1.0},
            "env": {"name": "calculator", "args": {"parser": "hermes"}, "max_turns": 2,
                    "max_total_tokens": case["completion"]},
            "rl": {
                "prompts_per_step": case["prompts"], "group_size": case["group"], "epochs": 1, "minibatches": 1,
                "advantage": "grpo", "policy_loss": "ppo", "policy_loss_args": {"clip_low": 0.2, "clip_high": 0.2},
                "loss_aggregation": "token_mean",
                "sampling": {"max_new_tokens": case["completion"], "temperature": case["temperature"]},
                "kl": {"coef": case["beta"], "estimator": "k3", "in_reward": False},
            },
            "output_dir": out, "seed": case["seed"], "device": "cpu",
        }  # fmt: skip
        result = api.rl(config, model=model, tokenizer=tokenizer, train=rows, rewards=[final_answer_reward],
                        progress=False)  # fmt: skip
    measured = result.history[case["warmup"] :]
    return {
        **clock.report(case["warmup"]),
        "base_mb": base,
        "completion_tokens": statistics.mean(h["completion_length"] for h in measured),
        "tool_calls": statistics.mean(h.get("episodes/tool_calls", 0.0) for h in measured),
        "reward": statistics.mean(h["rewards/total/mean"] for h in measured),
        "gen_s": statistics.median(h["gen_s"] for h in measured),
        "env_s": statistics.median(h.get("time/env_s", 0.0) for h in measured),
        "train_s": statistics.median(h["train_s"] for h in measured),
        "path": path,
    }


def run_trl(case: dict[str, Any]) -> dict[str, Any]:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    from trl.chat_template_utils import qwen3_template

    from posttrain.envs.builtin_tools import calculator
    from posttrain.policies import load_tokenizer

    tokenizer = load_tokenizer(MODEL_DIR)
    tokenizer.response_template = qwen3_template  # TRL's Hermes <tool_call> reader; the template is TRL-compatible
    rows = tool_rows(4096, case["seed"])
    clock = harness.StepClock()
    with tempfile.TemporaryDirectory() as out:
        sequences = case["prompts"] * case["group"]
        args = GRPOConfig(
            **harness.trl_args(case, out, lr=case["lr"]),
            per_device_train_batch_size=sequences, num_generations=case["group"],
            max_completion_length=case["completion"], max_tool_calling_iterations=1,
            temperature=case["temperature"], top_p=1.0, top_k=0,
            beta=case["beta"], num_iterations=1, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        )  # fmt: skip
        trainer = GRPOTrainer(model=str(MODEL_DIR), reward_funcs=final_answer_reward, args=args,
                              train_dataset=Dataset.from_list(rows), processing_class=tokenizer, tools=[calculator],
                              callbacks=[clock.trainer_callback()])  # fmt: skip
        base = harness.base_memory_mb()
        trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h][case["warmup"] :]
    return {
        **clock.report(case["warmup"]),
        "base_mb": base,
        "completion_tokens": statistics.mean(h["completions/mean_length"] for h in logs),
        "tool_calls": statistics.mean(h.get("tools/call_frequency", float("nan")) for h in logs),
        "reward": statistics.mean(h["reward"] for h in logs),
    }


SIDES = {"prepare": prepare, "posttrain": run_posttrain, "trl": run_trl}


def main() -> None:
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=8, help="prompts per step (P)")
    p.add_argument("--group", type=int, default=8, help="episodes per prompt (G)")
    p.add_argument("--completion", type=int, default=48, help="most tokens after the prompt, tool output included")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (> 0: both sides run a reference)")
    p.add_argument("--sft-steps", type=int, default=300, help="SFT steps of the warm start both sides load")
    p.add_argument("--retries", type=int, default=harness.RETRIES,
                   help="re-runs of a worker that ran beside other work (harness.RETRIES)")  # fmt: skip
    args = p.parse_args()
    if args.worker:
        return harness.worker_main(args.worker, SIDES)
    harness.RETRIES = args.retries
    steps = 2 if args.quick else args.steps or 4
    case = agent_case(prompts=args.prompts, group=args.group, completion=args.completion, beta=args.beta,
                      steps=steps, warmup=args.warmup, sft_steps=args.sft_steps)  # fmt: skip
    print(f"tool-using GRPO step: {case}", flush=True)
    harness.run_worker(__file__, "prepare", case, args.threads)
    sides = harness.alternate(__file__, case, ["posttrain", "trl"], rounds=1 if args.quick else args.rounds,
                              threads=args.threads)  # fmt: skip
    ours, theirs = sides["posttrain"].extra, sides["trl"].extra
    notes = [f"tokens after the prompt per episode: posttrain {ours['completion_tokens']:.1f}, TRL "
             f"{theirs['completion_tokens']:.1f}; tool calls per episode: posttrain {ours['tool_calls']:.2f}, TRL "
             f"{theirs['tool_calls']:.2f} (TRL logs calls per sample); mean reward: posttrain {ours['reward']:.3f}, "
             f"TRL {theirs['reward']:.3f}; posttrain's step: generation {ours['gen_s']:.2f} s (tools "
             f"{ours['env_s']:.3f} s), training {ours['train_s']:.2f} s; {ours['path']}"]  # fmt: skip
    cases = [harness.CaseResult("tool-using GRPO step", "tiny", case, "s", sides, notes=notes)]
    harness.print_cases(cases)
    print(f"wrote {harness.write_json(args.json, __file__, cases)}")


if __name__ == "__main__":
    main()
