"""Reward models (`posttrain rm`): a scalar head on a transformer, trained on preference pairs
(Bradley-Terry, with an optional per-row `margin` column) or on scored lists (listwise losses).

A step takes `train.batch_size` examples; a pair's chosen and rejected rows go through one forward
(2N rows); the loss is the mean over the step's examples, so micro-batching never changes the update.
The saved model loads with `AutoModelForSequenceClassification.from_pretrained(dir)`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from posttrain.config import ConfigError
from posttrain.config.pref import RMConfig, feedback_kind
from posttrain.data import EpochSampler, check_positions, chunks
from posttrain.objectives.registry import REWARD_MODEL_LOSSES, call_with
from posttrain.objectives.reward_model import pairwise_accuracy
from posttrain.policies import build_reward_model, disable_dropout, scalar_rewards
from posttrain.runtime.checkpoint import model_dir
from posttrain.runtime.logging import phase
from posttrain.trainers.build import (
    build_optimisation,
    build_tokenizer_for,
    load_checkpoint_weights,
    resolve_path,
    set_chat_template,
)
from posttrain.trainers.lifecycle import Lifecycle, RunResult
from posttrain.trainers.preference_step import collate_feedback
from posttrain.trainers.splits import Rows, Tokens, load_feedback


def train_rm(
    cfg: RMConfig,
    *,
    model: Any = None,
    tokenizer: Any = None,
    train_rows: Rows | None = None,
    eval_rows: Rows | None = None,
    resume: bool = False,
    progress: bool = True,
) -> RunResult:
    """Train a reward model. Objects passed in (model, tokenizer, rows) replace the config's."""
    life = Lifecycle(cfg, kind="rm", resume=resume)
    if life.complete:
        return life.finished_result()
    loss_fn, args, bf16, device = REWARD_MODEL_LOSSES[cfg.rm.loss], cfg.rm.loss_args, cfg.train.bf16, life.device
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer_for(cfg.model, cfg.recipe_dir, model)
    set_chat_template(tokenizer, cfg.model.chat_template, cfg.recipe_dir)
    if model is None:
        model = reward_model_for(cfg, tokenizer, life.checkpoint).to(device)
    elif life.checkpoint is not None:
        load_checkpoint_weights(model, life.checkpoint)
    if cfg.model.disable_dropout:
        disable_dropout(model)
    check_positions(model, {"data.max_length": cfg.data.max_length})
    pad_id, kind = tokenizer.pad_token_id, feedback_kind(loss_fn)
    load = dict(seed=cfg.seed, recipe_dir=cfg.recipe_dir)
    with phase("reading and encoding the data", enabled=progress):  # before the log opens: the flag decides
        train = load_feedback(cfg.data, kind, "train", tokenizer, rows=train_rows, **load)
        held_out = load_feedback(cfg.data, kind, "eval", tokenizer, rows=eval_rows, **load)
    eval_items = held_out.tokens[: cfg.eval.limit] if held_out else []
    cfg = life.fit_epochs(len(train.tokens), cfg.train.batch_size)
    margins = {w: f["margin"] for w, f in train.fields.items() if cfg.rm.use_margin and "margin" in f}
    mb_size = cfg.train.micro_batch_size or cfg.train.batch_size
    sampler = EpochSampler(len(train.tokens), seed=cfg.seed, report=train.report)
    model = life.shard(model)
    optim = build_optimisation(model, cfg.train)
    life.track(model, tokenizer, optim, sampler)
    life.open_log(train.report, headline=("loss", "accuracy"), progress=progress, train_rows=train_rows,
                  eval_rows=eval_rows)  # fmt: skip

    def held_out_accuracy() -> dict[str, float]:
        return _held_out_accuracy(model, eval_items, mb_size, pad_id, device, bf16) if eval_items else {}

    initial_eval = life.evaluate_before(held_out_accuracy if eval_items else None)

    model.train()
    with life.stop_requests():
        for step in life.steps():
            started = time.perf_counter()
            indices = life.share(sampler.take(cfg.train.batch_size))  # this rank's share of the step
            totals: dict[str, float] = defaultdict(float)
            for chunk in chunks(indices, mb_size):
                items = [train.tokens[i] for i in chunk]
                inputs = _inputs(model, items, pad_id, device, bf16)
                if margins:
                    inputs["margin"] = torch.tensor([float(margins.get(it.where, 0.0)) for it in items], device=device)
                losses_N = call_with(loss_fn, inputs, args)
                (losses_N.sum() / cfg.train.batch_size).backward()
                totals["loss"] += float(losses_N.detach().sum())
                best_N, worst_N = _best_and_worst(inputs)
                totals["accuracy"] += float((best_N > worst_N).sum())
                totals["reward_margin"] += float((best_N - worst_N).sum())
            totals = {key: life.global_sum(value) for key, value in sorted(totals.items())}
            grad_norm = life.update(model, loss=totals["loss"], step=step + 1)
            metrics = {k: v / cfg.train.batch_size for k, v in totals.items()} | {
                "grad_norm": grad_norm, **life.step_metrics(time.perf_counter() - started)
            }  # fmt: skip
            if life.eval_due(step + 1) and eval_items:
                metrics |= life.evaluate(held_out_accuracy)
            life.end_step(step + 1, metrics)

    return life.finish(life.evaluate(held_out_accuracy), initial_eval=initial_eval)


def reward_model_for(cfg: RMConfig, tokenizer: Any, checkpoint: Any) -> Any:
    """The reward model of model.path or model.preset, or on a resume the checkpoint's."""
    section = cfg.model
    if checkpoint is None and section.path is None and section.preset is None:
        raise ConfigError("model: set model.path (a local model directory) or model.preset, or pass model= from Python")
    path = model_dir(checkpoint) if checkpoint else section.path and resolve_path(section.path, cfg.recipe_dir)
    return build_reward_model(path=path, preset=section.preset, tokenizer=tokenizer, seed=cfg.seed,
                              dtype=section.dtype)  # fmt: skip


def _inputs(model: Any, items: list[Tokens], pad_id: int, device: torch.device, bf16: bool) -> dict[str, Tensor]:
    """The inputs reward-model losses name: chosen_rewards/rejected_rewards, or rewards_N_K/scores_N_K."""
    batch = collate_feedback(items, pad_id=pad_id)
    rewards_B = scalar_rewards(model, batch.input_ids_B_T.to(device), batch.attention_mask_B_T.to(device), bf16=bf16)
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
        "eval_examples": float(len(best_N)),
    }
