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
from typing import Any

from torch import Tensor

from posttrain.config import ConfigError
from posttrain.config.pref import PrefConfig, feedback_kind
from posttrain.data import EpochSampler, check_positions
from posttrain.objectives.registry import PREFERENCE_LOSSES
from posttrain.rewards import load_reward_fn
from posttrain.runtime.distributed import all_gather_objects
from posttrain.runtime.logging import phase
from posttrain.trainers.build import build_optimisation
from posttrain.trainers.evaluation import evaluate_with
from posttrain.trainers.lifecycle import Lifecycle, RunResult, sampling_generator
from posttrain.trainers.online_preference import train_online_pref
from posttrain.trainers.preference_step import PreferenceStep, build_models, evaluate_pairs, logps_per_item
from posttrain.trainers.splits import Rows, load_feedback


def train_pref(
    cfg: PrefConfig,
    *,
    model: Any = None,
    tokenizer: Any = None,
    train_rows: Rows | None = None,
    eval_rows: Rows | None = None,
    resume: bool = False,
    progress: bool = True,
) -> RunResult:
    """Optimise preferences offline, or in rounds on the policy's own samples when the config has an
    `online` section. Objects passed in (model, tokenizer, rows) replace the config's."""
    if cfg.online is not None:
        return train_online_pref(cfg, model=model, tokenizer=tokenizer, train_rows=train_rows,
                                 eval_rows=eval_rows, resume=resume, progress=progress)  # fmt: skip
    life = Lifecycle(cfg, kind="pref", resume=resume)
    if life.complete:
        return life.finished_result()
    device, loss_fn = life.device, PREFERENCE_LOSSES[cfg.pref.loss]
    if "whole_batch" in loss_fn.needs and life.ranks.distributed:
        raise ConfigError(f"pref.loss '{cfg.pref.loss}' couples the step's pairs, which data-parallel ranks would "
                          "split; run it on one process")  # fmt: skip
    model, tokenizer, reference = build_models(cfg, model, tokenizer, life.checkpoint, device)
    check_positions(model, {"data.max_length": cfg.data.max_length})
    pad_id, kind = tokenizer.pad_token_id, feedback_kind(loss_fn)
    load = dict(seed=cfg.seed, recipe_dir=cfg.recipe_dir, max_prompt_length=cfg.pref.max_prompt_length)
    with phase("reading and encoding the data", enabled=progress):  # before the log opens: the flag decides
        train = load_feedback(cfg.data, kind, "train", tokenizer, rows=train_rows, **load)
        held_out = load_feedback(cfg.data, kind, "eval", tokenizer, rows=eval_rows, **load)
    eval_items = held_out.tokens[: cfg.eval.limit] if held_out else []
    cfg = life.fit_epochs(len(train.tokens), cfg.train.batch_size)
    sampler = EpochSampler(len(train.tokens), seed=cfg.seed, report=train.report)
    model = life.shard(model)
    optim = build_optimisation(model, cfg.train)
    life.track(model, tokenizer, optim, sampler)
    log = life.open_log(train.report, headline=("loss", "pref_accuracy"), progress=progress, train_rows=train_rows,
                        eval_rows=eval_rows)  # fmt: skip
    update = PreferenceStep.of(cfg, pad_id, device, life.history, life.ranks)
    ref_cache: dict[str, list[Tensor]] = {}
    reference_built = reference is not None
    if reference is not None and cfg.pref.reference == "precomputed":
        log.print(f"reference: log-probs of {len(train.tokens)} training and {len(eval_items)} held-out examples, "
                  "computed once")  # fmt: skip
        with reference.active():
            ref_cache = {s: shared_logps(reference.model, items, update, shown=f"reference log-probs of the {s} "
                                         "examples") for s, items in (("train", train.tokens), ("eval", eval_items))}
        if "kl_reference_point" not in loss_fn.needs:
            reference = None  # every reference log-prob is cached: free the copy

    def held_out_metrics() -> dict[str, float]:
        return evaluate_pairs(model, reference, eval_items, ref_cache.get("eval"), update.scale, update.micro_batch,
                              pad_id, device, update.bf16, update.length_normalize)  # fmt: skip

    answer_prompts = held_out.answer_prompts[: cfg.eval.limit] if held_out else []
    reward = load_reward_fn(cfg.eval.reward, base_dir=cfg.recipe_dir) if answer_prompts else None

    def generation() -> Any:
        return evaluate_with(model, tokenizer, answer_prompts, reward, cfg.eval, generator=sampling_generator(cfg.seed))

    def held_out_all() -> dict[str, float]:
        metrics = held_out_metrics() if eval_items else {}
        return metrics | ({f"eval_{k}": v for k, v in generation().metrics().items()} if answer_prompts else {})

    initial_eval = life.evaluate_before(held_out_all if eval_items or answer_prompts else None)

    model.train()
    with life.stop_requests():
        for step in life.steps():
            started = time.perf_counter()
            indices = life.share(sampler.take(cfg.train.batch_size))  # this rank's share of the step
            items = [train.tokens[i] for i in indices]
            cached = [ref_cache["train"][i] for i in indices] if ref_cache else None
            totals = update.accumulate(model, reference, items, ref_logps=cached)
            grad_norm = life.update(model, loss=totals["loss"], step=step + 1)
            metrics = update.metrics(totals, cfg.train.batch_size) | {
                "grad_norm": grad_norm, **life.step_metrics(time.perf_counter() - started)
            }
            if life.eval_due(step + 1) and eval_items:
                metrics |= life.evaluate(held_out_metrics)
            life.end_step(step + 1, metrics)

    generated = None

    def held_out_at_end() -> dict[str, float]:
        nonlocal generated
        generated = generation() if answer_prompts else None
        pairs = held_out_metrics() if eval_items else {}
        return pairs | ({f"eval_{k}": v for k, v in generated.metrics().items()} if generated else {})

    final_eval = life.evaluate(held_out_at_end)
    return life.finish(final_eval, eval=generated, initial_eval=initial_eval, reference_built=reference_built)


def shared_logps(model: Any, items: list[Any], update: PreferenceStep, *, shown: str) -> list[Tensor]:
    """Every item's summed log-probs, each rank computing its share and all of them gathered on every rank."""
    ranks = update.ranks
    mine = logps_per_item(model, update.ranks.share(items), update.micro_batch, update.pad_id, update.device,
                          update.bf16, shown=shown if ranks.main else "")  # fmt: skip
    if not ranks.distributed:
        return mine
    shares = all_gather_objects(mine, ranks)
    return [shares[i % ranks.world][i // ranks.world] for i in range(len(items))]
