"""Offline preference optimisation (`posttrain pref`): the DPO family, reference-free, unpaired and
listwise losses, on a fixed dataset.

A step takes `train.batch_size` examples in seeded epoch order. Each micro-batch runs one forward over
every completion (a pair's chosen and rejected rows are stacked into one padded batch of 2N), sums the
completion log-probs, and hands the loss the inputs its signature names (`offline.call_with`). The loss
is the mean over the step's examples, so micro-batching never changes the update. Reference log-probs
come from a frozen copy of the initial model: once over the data before training (`precomputed`) or
each micro-batch (`on_the_fly`); losses that do not declare the `reference` need never build one.
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from posttrain.config.pref import PrefConfig
from posttrain.objectives.registry import PREFERENCE_LOSSES
from posttrain.policies import save_pretrained
from posttrain.rewards import load_reward_fn
from posttrain.runtime.checkpoint import Checkpointer, model_dir
from posttrain.runtime.device import limit_cpu_threads, resolve_device
from posttrain.runtime.logging import RunLogger
from posttrain.runtime.seeding import restore_rng_states, seed_everything
from posttrain.trainers.build import EpochSampler, Rows, build_optimisation, build_policy, chunks
from posttrain.trainers.evaluation import EvalResult, evaluate
from posttrain.trainers.offline import (
    Tokens,
    as_rows,
    call_with,
    collate_feedback,
    feedback_kind,
    frozen,
    hyper_default,
    kl_reference_point,
    load_feedback,
    logps_per_item,
    objective_inputs,
    sequence_logps,
)
from posttrain.trainers.run_state import clip_and_step, rewrite_metrics, save_checkpoint


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
    """Optimise preferences offline. Objects passed in (model, tokenizer, rows) replace the config's."""
    limit_cpu_threads()
    generator = seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    loss_fn, args, bf16 = PREFERENCE_LOSSES[cfg.pref.loss], cfg.pref.loss_args, cfg.train.bf16
    kind = feedback_kind(loss_fn.needs)
    run_dir = Path(cfg.output_dir)
    checkpointer = Checkpointer(run_dir, keep_last=cfg.train.keep_last)
    checkpoint = checkpointer.latest() if resume else None
    model, tokenizer, reference = _build_models(cfg, model, tokenizer, checkpoint, device)
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
    sampler = EpochSampler(len(train.tokens), seed=cfg.seed)
    optim = build_optimisation(model, cfg.train)
    history: list[dict[str, float]] = []
    start_step = 0
    if checkpoint is not None:
        state = checkpointer.load_state(checkpoint)
        optim.optimizer.load_state_dict(state["optimizer"])
        optim.scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["data"])
        restore_rng_states(state["rng"], {"sampling": generator})
        history, start_step = state["history"], state["step"]
        rewrite_metrics(run_dir, history)
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
        return _evaluate_pairs(
            model,
            reference,
            eval_items,
            ref_cache.get("eval"),
            scale,
            mb_size,
            pad_id,
            device,
            bf16,
            cfg.pref.length_normalize,
        )

    initial_eval = held_out_metrics() if eval_items and start_step == 0 else {}
    if initial_eval:
        log.log(0, initial_eval, kind="eval")

    model.train()
    for step in range(start_step, cfg.train.max_steps):
        started = time.perf_counter()
        indices = sampler.take(cfg.train.batch_size)
        items = [train.tokens[i] for i in indices]
        extra = {}
        if "kl_reference_point" in loss_fn.needs:
            extra["kl_ref_point"] = kl_reference_point(model, reference, items, pad_id, device, bf16)
        totals: dict[str, float] = defaultdict(float)
        for chunk in chunks(indices, mb_size):
            mb = [train.tokens[i] for i in chunk]
            cached = [ref_cache["train"][i] for i in chunk] if ref_cache else None
            inputs = _inputs(model, reference, mb, cached, pad_id, device, bf16, cfg.pref.length_normalize)
            losses_N = call_with(loss_fn, {**inputs, **extra}, args)
            (losses_N.sum() / len(items)).backward()
            totals["loss"] += float(losses_N.detach().sum())
            _add_metrics(totals, inputs, scale)
        grad_norm = clip_and_step(model, optim, cfg.train.max_grad_norm)
        metrics = {k: v / len(items) for k, v in totals.items()} | {
            "grad_norm": grad_norm,
            "lr": optim.scheduler.get_last_lr()[0],
            "step_time_s": time.perf_counter() - started,
            **{k: float(v) for k, v in extra.items()},
        }
        done = step + 1
        if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < cfg.train.max_steps and eval_items:
            metrics |= held_out_metrics()
        history.append({"step": done, **metrics})
        if done % cfg.train.log_every == 0 or done == cfg.train.max_steps:
            log.log(done, metrics)
        if cfg.train.save_every and done % cfg.train.save_every == 0 and done < cfg.train.max_steps:
            save_checkpoint(checkpointer, done, model, tokenizer, optim, sampler, generator, history)

    final_eval, generation = held_out_metrics() if eval_items else {}, None
    if held_out and held_out.answer_prompts:
        e = cfg.eval
        generation = evaluate(
            model,
            tokenizer,
            held_out.answer_prompts[: e.limit],
            load_reward_fn(e.reward, base_dir=cfg.recipe_dir),
            max_new_tokens=e.max_new_tokens,
            samples=e.samples,
            k=e.k,
            temperature=e.temperature,
            batch_size=e.batch_size,
            generator=generator,
        )
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


def _build_models(
    cfg: PrefConfig, model: Any, tokenizer: Any, checkpoint: Path | None, device: torch.device
) -> tuple[Any, Any, Any]:
    """(policy, tokenizer, frozen reference or None). The reference is always the initial model, also
    after a resume: it is built from the config (or copied from the model passed in) before any
    checkpoint weights are loaded."""
    needs_reference = "reference" in PREFERENCE_LOSSES[cfg.pref.loss].needs
    build = dict(seed=cfg.seed, device=device, recipe_dir=cfg.recipe_dir)
    if model is None or tokenizer is None:
        initial, tokenizer = build_policy(cfg.model, **build)
    else:
        initial = model
    reference = frozen(copy.deepcopy(initial)) if needs_reference else None
    if checkpoint is None:
        return initial, tokenizer, reference
    if model is not None:
        resumed = type(model).from_pretrained(model_dir(checkpoint)).to(device)
        model.load_state_dict(resumed.state_dict())
        return model, tokenizer, reference
    return build_policy(cfg.model, **build, path_override=model_dir(checkpoint))[0], tokenizer, reference


def _inputs(
    model: Any,
    reference: Any,
    items: list[Tokens],
    cached: list[Tensor] | None,
    pad_id: int,
    device: torch.device,
    bf16: bool,
    length_normalize: bool,
) -> dict[str, Tensor]:
    """The policy's inputs for a micro-batch (one forward), plus the reference's where there is one."""
    batch = collate_feedback(items, pad_id=pad_id)
    logp_B, len_B = sequence_logps(model, batch, device, bf16=bf16)
    ref_B = None
    if cached is not None:
        ref_B = as_rows(cached, items).to(device)
    elif reference is not None:
        with torch.no_grad():
            ref_B = sequence_logps(reference, batch, device, bf16=bf16)[0]
    if length_normalize:
        logp_B = logp_B / len_B.clamp(min=1.0)
        ref_B = None if ref_B is None else ref_B / len_B.clamp(min=1.0)
    inputs = objective_inputs(logp_B, len_B, items)
    if ref_B is not None:
        inputs |= objective_inputs(ref_B, len_B, items, prefix="ref_")
    return inputs


def _add_metrics(totals: dict[str, float], inputs: dict[str, Tensor], scale: float) -> None:
    """Sums over examples of implicit rewards (scale * log-ratio, or scale * log-prob without a
    reference), their margin, preference accuracy and log-probs; divided by the count when logged."""
    if "chosen" in inputs:
        r_c = scale * (inputs["chosen"] - inputs.get("ref_chosen", 0.0)).detach()
        r_r = scale * (inputs["rejected"] - inputs.get("ref_rejected", 0.0)).detach()
        totals["reward_chosen"] += float(r_c.sum())
        totals["reward_rejected"] += float(r_r.sum())
        totals["reward_margin"] += float((r_c - r_r).sum())
        totals["pref_accuracy"] += float((r_c > r_r).sum())
        totals["logp_chosen"] += float(inputs["chosen"].detach().sum())
        totals["logp_rejected"] += float(inputs["rejected"].detach().sum())
    elif "labels" in inputs:
        r = scale * (inputs["logps"] - inputs.get("ref_logps", 0.0)).detach()
        sign = inputs["labels"].float() * 2 - 1
        totals["reward_signed"] += float((sign * r).sum())
        totals["logp"] += float(inputs["logps"].detach().sum())
    else:
        r_N_K = scale * (inputs["logps_N_K"] - inputs.get("ref_logps_N_K", 0.0)).detach()
        best_N = inputs["scores_N_K"].argmax(dim=1)
        totals["pref_accuracy"] += float((r_N_K.argmax(dim=1) == best_N).sum())


@torch.no_grad()
def _evaluate_pairs(
    model: Any,
    reference: Any,
    items: list[Tokens],
    cached: list[Tensor] | None,
    scale: float,
    size: int,
    pad_id: int,
    device: torch.device,
    bf16: bool,
    length_normalize: bool,
) -> dict[str, float]:
    """Held-out implicit-reward metrics (accuracy: chosen reward > rejected), as `eval_*`."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = defaultdict(float)
    for start in range(0, len(items), size):
        mb = items[start : start + size]
        mb_cached = cached[start : start + size] if cached is not None else None
        _add_metrics(totals, _inputs(model, reference, mb, mb_cached, pad_id, device, bf16, length_normalize), scale)
    model.train(was_training)
    return {f"eval_{k}": v / len(items) for k, v in totals.items()}
