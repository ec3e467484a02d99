"""Reward models (`posttrain rm`): a scalar head on a transformer, trained on preference pairs
(Bradley-Terry, with an optional per-row `margin` column), on scored lists (listwise losses), or on stepwise rows
(a process reward model: a head at every token, read at each step's last token).

A step takes `train.batch_size` examples; a pair's chosen and rejected rows go through one forward
(2N rows); the loss is the mean over the step's examples (stepwise: over its labelled steps), so micro-batching
never changes the update. The saved model loads with `AutoModelForSequenceClassification.from_pretrained(dir)`;
a process reward model with `AutoModelForTokenClassification` too.
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
from posttrain.data.stepwise import StepwiseTokens, collate_stepwise
from posttrain.objectives.registry import REWARD_MODEL_LOSSES, call_with
from posttrain.objectives.reward_model import accuracy_by_bucket, pairwise_accuracy, preference_strength
from posttrain.policies import build_reward_model, disable_dropout, load_tokenizer, scalar_rewards, token_scores
from posttrain.runtime.checkpoint import model_dir
from posttrain.runtime.logging import phase
from posttrain.runtime.model_files import holds_tokenizer
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
    kind = feedback_kind(loss_fn)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer_for(cfg.model, cfg.recipe_dir, model)
    set_chat_template(tokenizer, cfg.model.chat_template, cfg.recipe_dir)
    if model is None:
        model = reward_model_for(cfg, tokenizer, life.checkpoint, per_token=kind == "stepwise").to(device)
    elif life.checkpoint is not None:
        load_checkpoint_weights(model, life.checkpoint)
    if cfg.model.disable_dropout:
        disable_dropout(model)
    check_positions(model, {"data.max_length": cfg.data.max_length})
    pad_id = tokenizer.pad_token_id
    load = dict(seed=cfg.seed, recipe_dir=cfg.recipe_dir)
    steps = {"separator": cfg.rm.step_separator} if kind == "stepwise" else None
    with phase("reading and encoding the data", enabled=progress):  # before the log opens: the flag decides
        train = load_feedback(cfg.data, kind, "train", tokenizer, rows=train_rows, **load,
                              encode_args=steps and {**steps, "last_step_only": cfg.rm.train_on_last_step_only})
        held_out = load_feedback(cfg.data, kind, "eval", tokenizer, rows=eval_rows, **load, encode_args=steps)
    eval_items = held_out.tokens[: cfg.eval.limit] if held_out else []
    cfg = life.fit_epochs(len(train.tokens), cfg.train.batch_size)
    margins = train.margins if cfg.rm.use_margin else {}
    mb_size = cfg.train.micro_batch_size or cfg.train.batch_size
    lines: tuple[str, ...] = ()
    if cfg.rm.margin_models:
        with phase("preference strength of the training pairs under rm.margin_models", enabled=progress):
            margins, lines = ensemble_margins(cfg, train.tokens, tokenizer, mb_size, device)
    sampler = EpochSampler(len(train.tokens), seed=cfg.seed, report=train.report)
    model = life.shard(model)
    optim = build_optimisation(model, cfg.train)
    life.track(model, tokenizer, optim, sampler)
    life.open_log(train.report, headline=("loss", "accuracy"), progress=progress, train_rows=train_rows,
                  eval_rows=eval_rows, lines=lines)  # fmt: skip
    labelled = held_out.margins if held_out else {}
    label_margins = [labelled.get(it.where) for it in eval_items]

    def held_out_accuracy() -> dict[str, float]:
        if kind == "stepwise":
            return _held_out_step_accuracy(model, eval_items, mb_size, pad_id, device, bf16) if eval_items else {}
        return _held_out_accuracy(model, eval_items, mb_size, pad_id, device, bf16, label_margins) if eval_items else {}

    initial_eval = life.evaluate_before(held_out_accuracy if eval_items else None)

    model.train()
    with life.stop_requests():
        for step in life.steps():
            started = time.perf_counter()
            indices = life.share(sampler.take(cfg.train.batch_size))  # this rank's share of the step
            terms = life.global_sum(sum(_loss_terms(train.tokens[i]) for i in indices))  # examples, or labelled steps
            totals: dict[str, float] = defaultdict(float)
            for chunk in chunks(indices, mb_size):
                items = [train.tokens[i] for i in chunk]
                inputs = _inputs(model, items, pad_id, device, bf16)
                if margins:
                    inputs["margin"] = torch.tensor([float(margins.get(it.where, 0.0)) for it in items], device=device)
                losses_N = call_with(loss_fn, inputs, args)
                (losses_N.sum() / terms).backward()
                totals["loss"] += float(losses_N.detach().sum())
                for key, value in _ranking_sums(inputs).items():
                    totals[key] += value
            totals = {key: life.global_sum(value) for key, value in sorted(totals.items())}
            grad_norm = life.update(model, loss=totals["loss"], step=step + 1)
            metrics = {k: v / terms for k, v in totals.items()} | {
                "grad_norm": grad_norm, **life.step_metrics(time.perf_counter() - started)
            }  # fmt: skip
            if life.eval_due(step + 1) and eval_items:
                metrics |= life.evaluate(held_out_accuracy)
            life.end_step(step + 1, metrics)

    return life.finish(life.evaluate(held_out_accuracy), initial_eval=initial_eval)


def reward_model_for(cfg: RMConfig, tokenizer: Any, checkpoint: Any, *, per_token: bool = False) -> Any:
    """The reward model of model.path or model.preset, or on a resume the checkpoint's; `per_token`: a process
    reward model (a token classifier)."""
    section = cfg.model
    if checkpoint is None and section.path is None and section.preset is None:
        raise ConfigError("model: set model.path (a local model directory) or model.preset, or pass model= from Python")
    path = model_dir(checkpoint) if checkpoint else section.path and resolve_path(section.path, cfg.recipe_dir)
    return build_reward_model(path=path, preset=section.preset, tokenizer=tokenizer, seed=cfg.seed,
                              dtype=section.dtype, per_token=per_token)  # fmt: skip


def ensemble_margins(
    cfg: RMConfig, items: list[Tokens], tokenizer: Any, size: int, device: torch.device
) -> tuple[dict[str, float], tuple[str, ...]]:
    """Each training pair's margin, margin_scale times its mean preference strength under the reward models of
    rm.margin_models (Secrets of RLHF II, arXiv:2401.06080), by the pair's `where`; and the run's line about them."""
    chosen, rejected = [], []
    for path in cfg.rm.margin_models:
        directory = resolve_path(path, cfg.recipe_dir)
        if holds_tokenizer(directory) and load_tokenizer(directory).get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"rm.margin_models: {path} has another tokenizer than the run's; the ensemble scores the "
                              "run's token ids, so its models must share the run's tokenizer")  # fmt: skip
        member = build_reward_model(path=directory, preset=None, tokenizer=tokenizer, seed=cfg.seed,
                                    dtype=cfg.model.dtype).to(device).eval()  # fmt: skip
        with torch.no_grad():
            scored = [_best_and_worst(_inputs(member, list(c), tokenizer.pad_token_id, device, cfg.train.bf16))
                      for c in chunks(items, size)]  # fmt: skip
        chosen.append(torch.cat([c for c, _ in scored]))
        rejected.append(torch.cat([r for _, r in scored]))
    mean_N, std_N = preference_strength(torch.stack(chosen), torch.stack(rejected))
    margins = {it.where: cfg.rm.margin_scale * float(u) for it, u in zip(items, mean_N.tolist(), strict=True)}
    below = float((mean_N < 0).float().mean())
    line = (f"rm.margin_models: {len(chosen)} reward models; mean preference strength {mean_N.mean():.3f} (std over "
            f"the models {std_N.mean():.3f}), {below:.1%} of the pairs below 0")  # fmt: skip
    return margins, (line,)


def _loss_terms(item: Tokens) -> int:
    """How many terms an example adds to the loss's mean: one, or a stepwise row's labelled steps."""
    return len(item.labels) if isinstance(item, StepwiseTokens) else 1


def _inputs(model: Any, items: list[Tokens], pad_id: int, device: torch.device, bf16: bool) -> dict[str, Tensor]:
    """The inputs reward-model losses name: chosen_rewards/rejected_rewards, rewards_N_K/scores_N_K, or
    step_logits_S/step_labels_S."""
    if isinstance(items[0], StepwiseTokens):
        steps = collate_stepwise(items, pad_id=pad_id)  # type: ignore[arg-type]
        logits_S = token_scores(model, steps.input_ids_B_T.to(device), steps.attention_mask_B_T.to(device),
                                steps.step_at_B_T.to(device), bf16=bf16)  # fmt: skip
        return {"step_logits_S": logits_S, "step_labels_S": steps.labels_S.to(device)}
    batch = collate_feedback(items, pad_id=pad_id)
    rewards_B = scalar_rewards(model, batch.input_ids_B_T.to(device), batch.attention_mask_B_T.to(device), bf16=bf16)
    if not hasattr(items[0], "completion_ids"):
        return {"chosen_rewards": rewards_B[0::2], "rejected_rewards": rewards_B[1::2]}
    k = len(items[0].completion_ids)  # type: ignore[union-attr]
    scores = torch.tensor([it.scores for it in items], device=device)  # type: ignore[union-attr]
    return {"rewards_N_K": rewards_B.view(-1, k), "scores_N_K": scores}


def _ranking_sums(inputs: dict[str, Tensor]) -> dict[str, float]:
    """A micro-batch's sums of the metrics a step logs per loss term: pairs (lists: best and worst) ranked right and
    their reward margins, or steps whose label the PRM predicts (p >= 1/2 for a right step)."""
    if "step_logits_S" in inputs:
        predicted_S = inputs["step_logits_S"].detach() >= 0
        return {"accuracy": float((predicted_S == inputs["step_labels_S"]).sum())}
    best_N, worst_N = _best_and_worst(inputs)
    return {"accuracy": float((best_N > worst_N).sum()), "reward_margin": float((best_N - worst_N).sum())}


def _best_and_worst(inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Rewards of the preferred and the dispreferred completion of each example (lists: best, worst)."""
    if "chosen_rewards" in inputs:
        return inputs["chosen_rewards"].detach(), inputs["rejected_rewards"].detach()
    r_N_K, s_N_K = inputs["rewards_N_K"].detach(), inputs["scores_N_K"]
    rows = torch.arange(len(r_N_K))
    return r_N_K[rows, s_N_K.argmax(dim=1)], r_N_K[rows, s_N_K.argmin(dim=1)]


@torch.no_grad()
def _held_out_step_accuracy(
    model: Any, items: list[Tokens], size: int, pad_id: int, device: torch.device, bf16: bool
) -> dict[str, float]:
    """A process reward model's held-out step accuracy (p >= 1/2 predicts a right step), and its recall of the right
    and of the wrong steps (the share of each it predicts), which a majority-class guess cannot both keep high."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for chunk in chunks(items, size):
        inputs = _inputs(model, list(chunk), pad_id, device, bf16)
        logits.append(inputs["step_logits_S"])
        labels.append(inputs["step_labels_S"])
    model.train(was_training)
    predicted_S, labels_S = torch.cat(logits) >= 0, torch.cat(labels)
    right, wrong = labels_S, ~labels_S
    metrics = {"eval_step_accuracy": float((predicted_S == labels_S).float().mean())}
    if right.any():
        metrics["eval_right_step_recall"] = float(predicted_S[right].float().mean())
    if wrong.any():
        metrics["eval_wrong_step_recall"] = float((~predicted_S[wrong]).float().mean())
    return metrics | {"eval_steps": float(len(labels_S))}


@torch.no_grad()
def _held_out_accuracy(
    model: Any, items: list[Tokens], size: int, pad_id: int, device: torch.device, bf16: bool,
    label_margins: list[Any] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Held-out pairwise accuracy (chosen reward > rejected; lists: best > worst), reward margin, and accuracy by
    margin bucket (`margin_buckets`)."""
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
        **margin_buckets(best_N - worst_N, label_margins),
    }


def margin_buckets(margins_N: Tensor, label_margins: list[Any] | None) -> dict[str, float]:
    """Accuracy by margin bucket: in the quartiles of the model's own |r_c - r_r| (q1 the least sure pairs, which a
    model that knows what it knows gets right less often than q4), and, where every held-out row has a `margin`
    column, at each of its values (up to 8 of them; else in its quartiles) with the pairs counted."""
    metrics: dict[str, float] = {}
    if len(margins_N) >= 8:
        sure_N = margins_N.abs()
        edges = torch.quantile(sure_N, torch.tensor([0.25, 0.5, 0.75]))
        accuracy, counts = accuracy_by_bucket(margins_N, sure_N, edges)
        metrics |= {f"eval_margin_q{i + 1}_accuracy": float(a) for i, (a, n) in enumerate(zip(accuracy, counts)) if n}
    if label_margins and all(isinstance(m, int | float) and not isinstance(m, bool) for m in label_margins):
        labels_N = torch.tensor(label_margins, dtype=torch.float32)
        values = labels_N.unique()
        if len(values) <= 8:
            edges, names = values[1:], [f"{v:g}" for v in values.tolist()]
        else:
            edges, names = torch.quantile(labels_N, torch.tensor([0.25, 0.5, 0.75])), [f"q{i + 1}" for i in range(4)]
        accuracy, counts = accuracy_by_bucket(margins_N, labels_N, edges)
        for name, a, n in zip(names, accuracy.tolist(), counts.tolist(), strict=True):
            if n:
                metrics |= {f"eval_label_margin_{name}_accuracy": a, f"eval_label_margin_{name}_pairs": n}
    return metrics
