"""Online and iterative preference optimisation (`posttrain pref` with an `online` section): rounds on the
policy's own samples.

A round draws `online.prompts_per_round` prompts (P), samples `online.samples_per_prompt` (N) completions
of each from the current policy (and N from an opponent when the loss needs one: the reference for XPO,
the policy/reference geometric mixture for Nash-MD), scores them with the rewards or a pairwise judge,
turns the scores into the examples the loss consumes (pairs, labelled completions or lists;
`objectives/pairing.py`), computes their reference log-probs once, and trains `online.steps_per_round`
optimiser steps of `train.batch_size` examples on them. The reference is the initial model (`keep`) or a
frozen copy of the policy at the start of each round (`refresh`). One step per round on two samples per
prompt is online DPO (Guo et al. 2024, arXiv:2402.04792); many steps per round is iterative DPO (Xiong et
al. 2023, arXiv:2312.11456; Dong et al. 2024, arXiv:2405.07863); the loss decides the rest (`nll` with
top-k selection is RAFT, Dong et al. 2023, arXiv:2304.06767; `sppo` is SPPO, arXiv:2405.00675; `xpo` XPO,
arXiv:2405.21046; `nash_md` Nash-MD, arXiv:2312.00886; `dpo` with a judge is DNO, arXiv:2404.03715).
Checkpoints and stop requests take effect at round boundaries (a round's samples are not saved).
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from posttrain.config.pref import SELECTIONS, PrefConfig, feedback_kind
from posttrain.data import check_positions
from posttrain.objectives.registry import PREFERENCE_LOSSES, call_with
from posttrain.policies import save_pretrained
from posttrain.rewards import RewardSet, RewardSpec, load_reward_fn
from posttrain.rollout import ENGINES, SamplingParams
from posttrain.runtime.guards import NonFiniteGuard
from posttrain.runtime.logging import RunLogger
from posttrain.runtime.signals import StopRequest
from posttrain.trainers.build import EpochSampler, Rows, build_optimisation, chunks, load_prompts
from posttrain.trainers.evaluation import EvalResult, evaluate_with
from posttrain.trainers.offline import hyper_default, kl_reference_point, logps_per_item
from posttrain.trainers.online_parts import Feedback, build_examples, sample_round
from posttrain.trainers.pref_parts import (
    RunningMean,
    add_preference_metrics,
    build_models,
    log_ratios,
    preference_inputs,
)
from posttrain.trainers.preference import PrefResult
from posttrain.trainers.run_state import clip_and_step, restore_checkpoint, save_checkpoint, start_run, step_metrics


def train_online_pref(
    cfg: PrefConfig,
    *,
    model: Any = None,
    tokenizer: Any = None,
    train_rows: Rows | None = None,
    eval_rows: Rows | None = None,
    resume: bool = False,
    progress: bool = True,
) -> PrefResult:
    """Optimise preferences in rounds on the policy's own samples. Objects passed in replace the config's;
    train_rows / eval_rows are prompt rows with the columns the rewards or judge read (`answer`, ...)."""
    generator, device, checkpointer, checkpoint = start_run(cfg, resume)
    online, loss_fn, args, bf16 = cfg.online, PREFERENCE_LOSSES[cfg.pref.loss], cfg.pref.loss_args, cfg.train.bf16
    needs, kind, length_normalize = set(loss_fn.needs), feedback_kind(loss_fn.needs), cfg.pref.length_normalize
    select = online.select or SELECTIONS[kind][0]
    opponent = "reference" if "reference_samples" in needs else "mixture" if "mixture_opponents" in needs else None
    run_dir = Path(cfg.output_dir)
    model, tokenizer, reference = build_models(cfg, model, tokenizer, checkpoint, device)
    new_tokens = {"online.sampling.max_new_tokens": online.sampling.max_new_tokens}
    check_positions(model, {"data.max_length": cfg.data.max_length, **new_tokens})
    pad_id, mb_size = tokenizer.pad_token_id, cfg.train.micro_batch_size or cfg.train.batch_size
    where = {"seed": cfg.seed, "recipe_dir": cfg.recipe_dir}
    train_prompts, report = load_prompts(cfg.data, tokenizer, "train", rows=train_rows, **where)
    eval_split, _ = load_prompts(cfg.data, tokenizer, "eval", rows=eval_rows, limit=cfg.eval.limit, **where)
    eval_prompts = [p for p in eval_split if "answer" in p.extra]
    eval_reward = load_reward_fn(cfg.eval.reward, base_dir=cfg.recipe_dir) if eval_prompts else None

    def held_out() -> EvalResult:
        # its own generator, so that evaluating never shifts training's
        generator = torch.Generator().manual_seed(cfg.seed + 1)
        return evaluate_with(model, tokenizer, eval_prompts, eval_reward, cfg.eval, generator=generator)

    feedback = _feedback(cfg)
    sampler = EpochSampler(len(train_prompts), seed=cfg.seed)
    optim = build_optimisation(model, cfg.train)
    history, start_step = restore_checkpoint(checkpointer, checkpoint, optim, sampler, generator)
    guard = NonFiniteGuard(cfg.train.max_bad_steps, checkpointer, history)
    shift = RunningMean.from_history(history)
    log = RunLogger(run_dir, total_steps=cfg.train.max_steps, start_step=start_step,
                    headline=("loss", "sample_accuracy"), progress=progress)  # fmt: skip
    log.print(f"data: {report.summary()}")
    s = online.sampling
    params = SamplingParams(
        max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p,
        stop_token_ids=(tokenizer.eos_token_id,), stop_strings=tuple(s.stop_strings),
    )  # fmt: skip
    scale = hyper_default(loss_fn, args, "beta") or 1.0
    initial_eval: dict[str, float] = {}
    if eval_prompts and start_step == 0:
        initial_eval = {f"eval_{k}": v for k, v in held_out().metrics().items()}
        log.log(0, initial_eval, kind="eval")
        log.print("initial eval: " + "  ".join(f"{k} {v:.4f}" for k, v in initial_eval.items()))

    model.train()
    spr = online.steps_per_round
    with StopRequest() as stop:
        for round_index in range(start_step // spr, cfg.train.max_steps // spr):
            if online.reference == "refresh" and reference is not None:
                reference.load_state_dict(model.state_dict())  # pi_t: the policy that samples this round
            prompts = [train_prompts[i] for i in sampler.take(online.prompts_per_round)]
            samples = sample_round(model, reference, tokenizer, prompts, feedback, engine=ENGINES[online.engine],
                                   params=params, n=online.samples_per_prompt, opponent=opponent,
                                   mixture_coef=online.mixture_coef, generator=generator)  # fmt: skip
            items, extras = build_examples(samples, kind, select=select, margin=online.margin,
                                           label_threshold=online.label_threshold, top_k=online.top_k,
                                           min_score=online.min_score, where=f"round {round_index + 1}")  # fmt: skip
            ref_cache = None
            if "reference" in needs and items:
                ref_cache = logps_per_item(reference, items, mb_size, pad_id, device, bf16)
            round_sampler = EpochSampler(len(items), seed=cfg.seed * 100_003 + round_index) if items else None
            round_metrics = {**samples.metrics, "examples": float(len(items)), "round": float(round_index + 1)}
            for step in range(round_index * spr, (round_index + 1) * spr):
                started = time.perf_counter()
                indices = round_sampler.take(min(cfg.train.batch_size, len(items))) if round_sampler else []
                batch = [items[i] for i in indices]
                extra: dict[str, Tensor] = {}
                if "kl_reference_point" in needs and batch:
                    extra["kl_ref_point"] = kl_reference_point(model, reference, batch, pad_id, device, bf16)
                if "reward_shift" in needs:
                    extra["reward_shift"] = torch.tensor(shift.mean, device=device)
                totals: dict[str, float] = defaultdict(float)
                for chunk in chunks(indices, mb_size):
                    mb = [items[i] for i in chunk]
                    cached = [ref_cache[i] for i in chunk] if ref_cache is not None else None
                    inputs = preference_inputs(model, None, mb, cached, pad_id, device, bf16, length_normalize)
                    inputs |= {k: v[torch.tensor(chunk)].to(device) for k, v in extras.items()}
                    losses_N = call_with(loss_fn, {**inputs, **extra}, args)
                    (losses_N.sum() / len(batch)).backward()
                    totals["loss"] += float(losses_N.detach().sum())
                    add_preference_metrics(totals, inputs, scale)
                    if "reward_shift" in needs:
                        shift.add(log_ratios(inputs))
                grad_norm = clip_and_step(model, optim, cfg.train.max_grad_norm, guard, loss=totals["loss"],
                                          step=step + 1)  # fmt: skip
                metrics = (
                    {k: v / max(1, len(batch)) for k, v in totals.items()}
                    | round_metrics
                    | {
                        "grad_norm": grad_norm,
                        **step_metrics(optim, guard, time.perf_counter() - started),
                        **{k: float(v) for k, v in extra.items()},
                        **(shift.state() if "reward_shift" in needs else {}),
                    }
                )
                history.append({"step": step + 1, **metrics})
                if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.max_steps:
                    log.log(step + 1, metrics)
            done = (round_index + 1) * spr
            if done < cfg.train.max_steps and _crossed(done, spr, cfg.train.eval_every) and eval_prompts:
                metrics = {f"eval_{k}": v for k, v in held_out().metrics().items()}
                log.log(done, metrics, kind="eval")
            saved = None
            if (done < cfg.train.max_steps and _crossed(done, spr, cfg.train.save_every)) or stop.requested:
                saved = save_checkpoint(checkpointer, done, model, tokenizer, optim, sampler, generator, history)
            if stop.requested:
                log.close()
                raise stop.interrupted(done, saved)

    final_eval, generation = {}, None
    if eval_prompts:
        generation = held_out()
        final_eval = {f"eval_{k}": v for k, v in generation.metrics().items()}
        log.log(cfg.train.max_steps, final_eval, kind="eval")
        log.print("eval: " + "  ".join(f"{k} {v:.4f}" for k, v in final_eval.items()))
    save_checkpoint(checkpointer, cfg.train.max_steps, model, tokenizer, optim, sampler, generator, history)
    final_dir = save_pretrained(model, tokenizer, run_dir / "final")
    if feedback.rewards is not None:
        feedback.rewards.close()
    log.close()
    return PrefResult(model, tokenizer, final_dir, history, initial_eval, final_eval, generation,
                      reference_built=reference is not None)  # fmt: skip


def _crossed(done: int, steps: int, every: int) -> bool:
    """Whether a multiple of `every` (0: never) fell within the `steps` steps that ended at `done`."""
    return bool(every) and done // every > (done - steps) // every


def _feedback(cfg: PrefConfig) -> Feedback:
    online = cfg.online
    if online.judge is not None:
        judge = load_reward_fn(online.judge.fn, online.judge.args, base_dir=cfg.recipe_dir)
        return Feedback(judge=judge, judge_timeout_s=online.judge.timeout_s)
    specs = [RewardSpec(**entry.model_dump()) for entry in online.rewards]
    return Feedback(RewardSet.from_specs(specs, cfg.recipe_dir, max_failure_fraction=online.max_failure_fraction))
