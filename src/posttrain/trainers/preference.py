"""Offline preference optimisation (`posttrain pref`): the DPO family, reference-free, unpaired and
listwise losses, on a fixed dataset.

A step takes `train.batch_size` examples in seeded epoch order. Each micro-batch runs one forward over
every completion (a pair's chosen and rejected rows are stacked into one padded batch of 2N), sums the
completion log-probs, and hands the loss the inputs its signature names (`objectives.registry.call_with`). The loss
is the mean over the step's examples, so micro-batching never changes the update. Reference log-probs
come from a frozen copy of the initial model: once over the data before training (`precomputed`) or
each micro-batch (`on_the_fly`); losses that do not declare the `reference` need never build one.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from posttrain.config.pref import PrefConfig, feedback_kind
from posttrain.data import check_positions
from posttrain.objectives.registry import PREFERENCE_LOSSES, call_with
from posttrain.policies import save_pretrained
from posttrain.rewards import load_reward_fn
from posttrain.runtime.guards import NonFiniteGuard
from posttrain.runtime.logging import RunLogger
from posttrain.runtime.signals import StopRequest
from posttrain.trainers.build import EpochSampler, Rows, build_optimisation, chunks
from posttrain.trainers.evaluation import EvalResult, evaluate_with
from posttrain.trainers.offline import (
    hyper_default,
    kl_reference_point,
    load_feedback,
    logps_per_item,
)
from posttrain.trainers.pref_parts import (
    RunningMean,
    add_preference_metrics,
    build_models,
    evaluate_pairs,
    log_ratios,
    preference_inputs,
)
from posttrain.trainers.run_state import (
    clip_and_step,
    eval_due,
    finish_step,
    restore_checkpoint,
    save_checkpoint,
    start_run,
    step_metrics,
)


@dataclass
class PrefResult:
    model: Any
    tokenizer: Any
    final_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)
    initial_eval: dict[str, float] = field(default_factory=dict)
    final_eval: dict[str, float] = field(default_factory=dict)
    eval: EvalResult | None = None
    reference_built: bool = False


def train_pref(
    cfg: PrefConfig,
    *,
    model: Any = None,
    tokenizer: Any = None,
    train_rows: Rows | None = None,
    eval_rows: Rows | None = None,
    resume: bool = False,
    progress: bool = True,
) -> PrefResult:
    """Optimise preferences offline, or in rounds on the policy's own samples when the config has an
    `online` section. Objects passed in (model, tokenizer, rows) replace the config's."""
    if cfg.online is not None:
        from posttrain.trainers.online_preference import train_online_pref  # it imports this module

        return train_online_pref(cfg, model=model, tokenizer=tokenizer, train_rows=train_rows,
                                 eval_rows=eval_rows, resume=resume, progress=progress)  # fmt: skip
    generator, device, checkpointer, checkpoint = start_run(cfg, resume)
    loss_fn, args, bf16 = PREFERENCE_LOSSES[cfg.pref.loss], cfg.pref.loss_args, cfg.train.bf16
    kind, length_normalize = feedback_kind(loss_fn.needs), cfg.pref.length_normalize
    run_dir = Path(cfg.output_dir)
    model, tokenizer, reference = build_models(cfg, model, tokenizer, checkpoint, device)
    check_positions(model, {"data.max_length": cfg.data.max_length})
    pad_id = tokenizer.pad_token_id
    load = dict(seed=cfg.seed, recipe_dir=cfg.recipe_dir)
    train = load_feedback(cfg.data, kind, "train", tokenizer, rows=train_rows, **load)
    held_out = load_feedback(cfg.data, kind, "eval", tokenizer, rows=eval_rows, **load)
    eval_items = held_out.tokens[: cfg.eval.limit] if held_out else []
    mb_size = cfg.train.micro_batch_size or cfg.train.batch_size
    ref_cache: dict[str, list[Tensor]] = {}
    if reference is not None and cfg.pref.reference == "precomputed":
        ref_cache = {
            s: logps_per_item(reference, items, mb_size, pad_id, device, bf16)
            for s, items in (("train", train.tokens), ("eval", eval_items))
        }
        if "kl_reference_point" not in loss_fn.needs:
            reference = None  # every reference log-prob is cached: free the copy
    sampler = EpochSampler(len(train.tokens), seed=cfg.seed, report=train.report)
    optim = build_optimisation(model, cfg.train)
    history, start_step = restore_checkpoint(checkpointer, checkpoint, optim, sampler, generator)
    guard = NonFiniteGuard(cfg.train.max_bad_steps, checkpointer, history)
    shift = RunningMean.from_history(history)
    log = RunLogger(
        run_dir,
        total_steps=cfg.train.max_steps,
        start_step=start_step,
        headline=("loss", "pref_accuracy"),
        progress=progress,
    )
    log.print(f"data: {train.report.summary()}")
    scale = hyper_default(loss_fn, args, "beta") or 1.0

    def held_out_metrics() -> dict[str, float]:
        return evaluate_pairs(
            model,
            reference,
            eval_items,
            ref_cache.get("eval"),
            scale,
            mb_size,
            pad_id,
            device,
            bf16,
            length_normalize,
        )

    initial_eval = held_out_metrics() if eval_items and start_step == 0 else {}
    if initial_eval:
        log.log(0, initial_eval, kind="eval")

    model.train()

    def save(step: int) -> Path:
        return save_checkpoint(checkpointer, step, model, tokenizer, optim, sampler, generator, history)

    with StopRequest() as stop:
        for step in range(start_step, cfg.train.max_steps):
            started = time.perf_counter()
            indices = sampler.take(cfg.train.batch_size)
            items = [train.tokens[i] for i in indices]
            extra = {}
            if "kl_reference_point" in loss_fn.needs:
                extra["kl_ref_point"] = kl_reference_point(model, reference, items, pad_id, device, bf16)
            if "reward_shift" in loss_fn.needs:
                extra["reward_shift"] = torch.tensor(shift.mean, device=device)
            totals: dict[str, float] = defaultdict(float)
            for chunk in chunks(indices, mb_size):
                mb = [train.tokens[i] for i in chunk]
                cached = [ref_cache["train"][i] for i in chunk] if ref_cache else None
                inputs = preference_inputs(model, reference, mb, cached, pad_id, device, bf16, length_normalize)
                losses_N = call_with(loss_fn, {**inputs, **extra}, args)
                (losses_N.sum() / len(items)).backward()
                totals["loss"] += float(losses_N.detach().sum())
                add_preference_metrics(totals, inputs, scale)
                if "reward_shift" in loss_fn.needs:
                    shift.add(log_ratios(inputs))
            grad_norm = clip_and_step(model, optim, cfg.train.max_grad_norm, guard, loss=totals["loss"], step=step + 1)
            metrics = {k: v / len(items) for k, v in totals.items()} | {
                "grad_norm": grad_norm,
                **step_metrics(optim, guard, time.perf_counter() - started),
                **{k: float(v) for k, v in extra.items()},
                **(shift.state() if "reward_shift" in loss_fn.needs else {}),
            }
            done = step + 1
            if eval_due(cfg.train, done) and eval_items:
                metrics |= held_out_metrics()
            finish_step(done, metrics, history, log, cfg.train, stop, save)

    final_eval, generation = held_out_metrics() if eval_items else {}, None
    if held_out and held_out.answer_prompts:
        e = cfg.eval
        reward = load_reward_fn(e.reward, base_dir=cfg.recipe_dir)
        generation = evaluate_with(model, tokenizer, held_out.answer_prompts[: e.limit], reward, e, generator=generator)
        final_eval |= {f"eval_{k}": v for k, v in generation.metrics().items()}
    if final_eval:
        log.log(cfg.train.max_steps, final_eval, kind="eval")
        log.print("eval: " + "  ".join(f"{k} {v:.4f}" for k, v in final_eval.items()))
    save_checkpoint(checkpointer, cfg.train.max_steps, model, tokenizer, optim, sampler, generator, history)
    final_dir = save_pretrained(model, tokenizer, run_dir / "final")
    log.close()
    return PrefResult(
        model,
        tokenizer,
        final_dir,
        history,
        initial_eval,
        final_eval,
        generation,
        reference_built=bool(ref_cache) or reference is not None,
    )
