"""Reward models (`posttrain rm`): a scalar head on a transformer, trained on preference pairs
(Bradley-Terry, with an optional per-row `margin` column) or on scored lists (listwise losses).

A step takes `train.batch_size` examples; a pair's chosen and rejected rows go through one forward
(2N rows); the loss is the mean over the step's examples, so micro-batching never changes the update.
The saved model loads with `AutoModelForSequenceClassification.from_pretrained(dir)`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import AutoModelForSequenceClassification

from posttrain.config.pref import RMConfig, feedback_kind
from posttrain.config.sections import ModelSection
from posttrain.data import check_positions
from posttrain.objectives.registry import REWARD_MODEL_LOSSES, call_with
from posttrain.objectives.reward_model import pairwise_accuracy
from posttrain.policies import MODEL_PRESETS, ModelLoadError, save_pretrained
from posttrain.policies.models import DTYPES, preset_config
from posttrain.runtime.checkpoint import model_dir
from posttrain.runtime.guards import NonFiniteGuard
from posttrain.runtime.logging import RunLogger
from posttrain.runtime.signals import StopRequest
from posttrain.trainers.build import (
    EpochSampler,
    Rows,
    build_optimisation,
    build_tokenizer_for,
    chunks,
    load_checkpoint_weights,
    resolve_path,
)
from posttrain.trainers.offline import Tokens, collate_feedback, load_feedback
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
class RMResult:
    model: Any
    tokenizer: Any
    final_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)
    initial_eval: dict[str, float] = field(default_factory=dict)
    final_eval: dict[str, float] = field(default_factory=dict)


def train_rm(
    cfg: RMConfig,
    *,
    model: Any = None,
    tokenizer: Any = None,
    train_rows: Rows | None = None,
    eval_rows: Rows | None = None,
    resume: bool = False,
    progress: bool = True,
) -> RMResult:
    """Train a reward model. Objects passed in (model, tokenizer, rows) replace the config's."""
    generator, device, checkpointer, checkpoint = start_run(cfg, resume)
    loss_fn, args, bf16 = REWARD_MODEL_LOSSES[cfg.rm.loss], cfg.rm.loss_args, cfg.train.bf16
    kind = feedback_kind(loss_fn.needs)
    run_dir = Path(cfg.output_dir)
    if model is None or tokenizer is None:
        tokenizer = build_tokenizer_for(cfg.model, cfg.recipe_dir)
        override = model_dir(checkpoint) if checkpoint else None
        model = build_reward_model(
            cfg.model, tokenizer, seed=cfg.seed, recipe_dir=cfg.recipe_dir, path_override=override
        ).to(device)
    elif checkpoint is not None:
        load_checkpoint_weights(model, checkpoint)
    check_positions(model, {"data.max_length": cfg.data.max_length})
    pad_id = tokenizer.pad_token_id
    load = dict(seed=cfg.seed, recipe_dir=cfg.recipe_dir)
    train = load_feedback(cfg.data, kind, "train", tokenizer, rows=train_rows, **load)
    held_out = load_feedback(cfg.data, kind, "eval", tokenizer, rows=eval_rows, **load)
    eval_items = held_out.tokens[: cfg.eval.limit] if held_out else []
    margins = {w: f["margin"] for w, f in train.fields.items() if cfg.rm.use_margin and "margin" in f}
    mb_size = cfg.train.micro_batch_size or cfg.train.batch_size
    sampler = EpochSampler(len(train.tokens), seed=cfg.seed, report=train.report)
    optim = build_optimisation(model, cfg.train)
    history, start_step = restore_checkpoint(checkpointer, checkpoint, optim, sampler, generator)
    guard = NonFiniteGuard(cfg.train.max_bad_steps, checkpointer, history)
    log = RunLogger(
        run_dir,
        total_steps=cfg.train.max_steps,
        start_step=start_step,
        headline=("loss", "accuracy"),
        progress=progress,
    )
    log.print(f"data: {train.report.summary()}")
    initial_eval = _held_out_accuracy(model, eval_items, mb_size, pad_id, device, bf16) if eval_items else {}
    if initial_eval:
        log.log(0, initial_eval, kind="eval")

    model.train()

    def save(step: int) -> Path:
        return save_checkpoint(checkpointer, step, model, tokenizer, optim, sampler, generator, history)

    with StopRequest() as stop:
        for step in range(start_step, cfg.train.max_steps):
            started = time.perf_counter()
            indices = sampler.take(cfg.train.batch_size)
            totals: dict[str, float] = defaultdict(float)
            for chunk in chunks(indices, mb_size):
                items = [train.tokens[i] for i in chunk]
                inputs = _inputs(model, items, pad_id, device, bf16)
                if margins:
                    inputs["margin"] = torch.tensor([float(margins.get(it.where, 0.0)) for it in items], device=device)
                losses_N = call_with(loss_fn, inputs, args)
                (losses_N.sum() / len(indices)).backward()
                totals["loss"] += float(losses_N.detach().sum())
                best_N, worst_N = _best_and_worst(inputs)
                totals["accuracy"] += float((best_N > worst_N).sum())
                totals["reward_margin"] += float((best_N - worst_N).sum())
            grad_norm = clip_and_step(model, optim, cfg.train.max_grad_norm, guard, loss=totals["loss"], step=step + 1)
            metrics = {k: v / len(indices) for k, v in totals.items()} | {
                "grad_norm": grad_norm,
                **step_metrics(optim, guard, time.perf_counter() - started),
            }
            done = step + 1
            if eval_due(cfg.train, done) and eval_items:
                metrics |= _held_out_accuracy(model, eval_items, mb_size, pad_id, device, bf16)
            finish_step(done, metrics, history, log, cfg.train, stop, save)

    final_eval = _held_out_accuracy(model, eval_items, mb_size, pad_id, device, bf16) if eval_items else {}
    if final_eval:
        log.log(cfg.train.max_steps, final_eval, kind="eval")
        log.print("eval: " + "  ".join(f"{k} {v:.4f}" for k, v in final_eval.items()))
    save_checkpoint(checkpointer, cfg.train.max_steps, model, tokenizer, optim, sampler, generator, history)
    final_dir = save_pretrained(model, tokenizer, run_dir / "final")
    log.close()
    return RMResult(model, tokenizer, final_dir, history, initial_eval, final_eval)


def build_reward_model(
    section: ModelSection, tokenizer: Any, *, seed: int, recipe_dir: str | None, path_override: str | Path | None = None
) -> Any:
    """A sequence classifier with one output (the reward): from model.path (a causal LM's body gets a
    new, seeded head) or a new model of model.preset. pad_token_id is set: the head reads the last
    non-padding token."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if path_override is not None or section.path is not None:
            path = path_override or resolve_path(section.path, recipe_dir)
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, dtype=DTYPES[section.dtype], local_files_only=True
            )
        else:
            if section.preset not in MODEL_PRESETS:
                raise ModelLoadError(
                    f"model.preset: '{section.preset}' is not a preset; presets: {', '.join(MODEL_PRESETS)}"
                )
            config = preset_config(
                section.preset,
                vocab_size=len(tokenizer),
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config, dtype=DTYPES[section.dtype])
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def scalar_rewards(model: Any, items: list[Tokens], pad_id: int, device: torch.device, bf16: bool) -> Tensor:
    """One reward per row of the items' batch [B] (pairs: chosen rows, then rejected rows)."""
    batch = collate_feedback(items, pad_id=pad_id)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(
            input_ids=batch.input_ids_B_T.to(device),
            attention_mask=batch.attention_mask_B_T.long().to(device),
            use_cache=False,
        ).logits
    return logits.squeeze(-1).float()


def _inputs(model: Any, items: list[Tokens], pad_id: int, device: torch.device, bf16: bool) -> dict[str, Tensor]:
    """The inputs reward-model losses name: chosen_rewards/rejected_rewards, or rewards_N_K/scores_N_K."""
    rewards_B = scalar_rewards(model, items, pad_id, device, bf16)
    if not hasattr(items[0], "completion_ids"):
        return {"chosen_rewards": rewards_B[0::2], "rejected_rewards": rewards_B[1::2]}
    k = len(items[0].completion_ids)  # type: ignore[union-attr]
    scores = torch.tensor([it.scores for it in items], device=device)  # type: ignore[union-attr]
    return {"rewards_N_K": rewards_B.view(-1, k), "scores_N_K": scores}


def _best_and_worst(inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Rewards of the preferred and the dispreferred completion of each example (lists: best, worst)."""
    if "chosen_rewards" in inputs:
        return inputs["chosen_rewards"].detach(), inputs["rejected_rewards"].detach()
    r_N_K, s_N_K = inputs["rewards_N_K"].detach(), inputs["scores_N_K"]
    rows = torch.arange(len(r_N_K))
    return r_N_K[rows, s_N_K.argmax(dim=1)], r_N_K[rows, s_N_K.argmin(dim=1)]


@torch.no_grad()
def _held_out_accuracy(
    model: Any, items: list[Tokens], size: int, pad_id: int, device: torch.device, bf16: bool
) -> dict[str, float]:
    """Held-out pairwise accuracy (chosen reward > rejected; lists: best > worst) and reward margin."""
    was_training = model.training
    model.eval()
    best, worst = [], []
    for chunk in chunks(items, size):
        b, w = _best_and_worst(_inputs(model, list(chunk), pad_id, device, bf16))
        best.append(b)
        worst.append(w)
    model.train(was_training)
    best_N, worst_N = torch.cat(best), torch.cat(worst)
    return {
        "eval_accuracy": float(pairwise_accuracy(best_N, worst_N)),
        "eval_reward_margin": float((best_N - worst_N).mean()),
    }
