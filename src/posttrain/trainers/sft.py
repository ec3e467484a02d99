"""Supervised fine-tuning: next-token NLL on demonstrations (`posttrain sft`).

A step takes `train.batch_size` examples in seeded epoch order, splits them into micro-batches of
similar length (or packs them into rows of `data.max_length`), and averages the NLL over the step's
target tokens, so micro-batching never changes the update.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from posttrain.config.sft import SFTConfig
from posttrain.data import (
    EpochSampler,
    SFTExample,
    SFTTokens,
    TokenBatch,
    check_positions,
    chunks,
    collate_packed,
    collate_sft,
    encode_prompts,
    encode_sft,
)
from posttrain.data.batching import pack_by_length
from posttrain.data.report import LoadReport
from posttrain.objectives.aggregation import token_mean
from posttrain.policies import token_logprobs
from posttrain.rewards import load_reward_fn
from posttrain.runtime.logging import phase
from posttrain.trainers.build import build_optimisation, policy_and_reference
from posttrain.trainers.evaluation import EvalResult, evaluate_with
from posttrain.trainers.lifecycle import Lifecycle, RunResult
from posttrain.trainers.splits import Rows, load_split


def train_sft(
    cfg: SFTConfig,
    *,
    model: Any = None,
    tokenizer: Any = None,
    train_rows: Rows | None = None,
    eval_rows: Rows | None = None,
    resume: bool = False,
    progress: bool = True,
) -> RunResult:
    """Fine-tune on demonstrations. Objects passed in (model, tokenizer, rows) replace the config's."""
    life = Lifecycle(cfg, kind="sft", resume=resume)
    if life.complete:
        return life.finished_result()
    device = life.device
    model, tokenizer, _ = policy_and_reference(
        cfg.model, model, tokenizer, life.checkpoint, needs_reference=False, seed=cfg.seed, device=device,
        recipe_dir=cfg.recipe_dir, run_dir=life.run_dir,
    )  # fmt: skip
    check_positions(model, {"data.max_length": cfg.data.max_length})
    with phase("reading and encoding the data", enabled=progress):  # before the log opens: the flag decides
        train, report = _encode_train(cfg, tokenizer, train_rows)
        cfg = life.fit_epochs(len(train), cfg.train.batch_size)
        eval_prompts, eval_tokens = _encode_eval(cfg, tokenizer, eval_rows)
    sampler = EpochSampler(len(train), seed=cfg.seed, report=report)
    model = life.shard(model)
    optim = build_optimisation(model, cfg.train)
    life.track(model, tokenizer, optim, sampler)
    life.open_log(report, headline=("loss", "tokens_per_s"), progress=progress, train_rows=train_rows,
                  eval_rows=eval_rows)  # fmt: skip
    reward = load_reward_fn(cfg.eval.reward, base_dir=cfg.recipe_dir) if eval_prompts else None

    def evaluate() -> tuple[dict[str, float], EvalResult | None]:
        return _evaluate_metrics(model, tokenizer, eval_prompts, eval_tokens, reward, cfg, device, life.generator)

    life.evaluate_before((lambda: evaluate()[0]) if eval_prompts or eval_tokens else None, say="before training")
    model.train()
    with life.stop_requests():
        for step in life.steps():
            started = time.perf_counter()
            items = life.share([train[i] for i in sampler.take(cfg.train.batch_size)])  # this rank's share
            micro_batches = _micro_batches(
                items,
                size=cfg.train.micro_batch_size,
                packing=cfg.data.packing,
                max_length=cfg.data.max_length,
                pad_id=tokenizer.pad_token_id,
            )
            num_tokens = int(life.global_sum(sum(mb.num_target_tokens for mb in micro_batches)))
            local = sum(_backward_nll(model, mb, num_tokens, device, bf16=cfg.train.bf16) for mb in micro_batches)
            loss = life.global_sum(local)
            grad_norm = life.update(model, loss=loss, step=step + 1)
            elapsed = time.perf_counter() - started
            metrics = {
                "loss": float(loss),
                "grad_norm": grad_norm,
                "tokens": num_tokens,
                "tokens_per_s": num_tokens / elapsed,
                **life.step_metrics(elapsed),
            }
            if life.eval_due(step + 1):
                metrics |= life.evaluate(lambda: evaluate()[0])
            life.end_step(step + 1, metrics)

    final_eval = None

    def evaluate_at_end() -> dict[str, float]:
        nonlocal final_eval
        metrics, final_eval = evaluate()
        return metrics

    eval_metrics = life.evaluate(evaluate_at_end) if eval_prompts or eval_tokens else {}
    return life.finish(eval_metrics, eval=final_eval)


def _encode_train(cfg: SFTConfig, tokenizer: Any, rows: Rows | None) -> tuple[Sequence[SFTTokens], LoadReport]:
    examples, report = load_split(cfg.data, "sft", "train", seed=cfg.seed, recipe_dir=cfg.recipe_dir, rows=rows)
    tokens = encode_sft(
        examples,
        tokenizer,
        max_length=cfg.data.max_length,
        truncation=cfg.data.truncation,
        completion_only=cfg.data.completion_only,
        report=report,
    )
    return tokens, report


def _encode_eval(cfg: SFTConfig, tokenizer: Any, rows: Rows | None) -> tuple[list[Any], Sequence[SFTTokens]]:
    """Prompts with an `answer` (for accuracy) and demonstrations (for held-out loss), either may be empty."""
    loaded = load_split(cfg.data, "prompt", "eval", seed=cfg.seed, recipe_dir=cfg.recipe_dir, rows=rows)
    if loaded is None:
        return [], []
    examples, report = loaded
    if cfg.eval.limit is not None:
        examples = examples[: cfg.eval.limit]
    prompts = encode_prompts(examples, tokenizer, max_length=cfg.data.max_length, report=report)
    with_answer = [p for p in prompts if "answer" in p.extra]
    demonstrations = [e for e in examples if "completion" in e.extra]
    tokens = (
        encode_sft(
            [_as_sft(e) for e in demonstrations],
            tokenizer,
            max_length=cfg.data.max_length,
            truncation=cfg.data.truncation,
            completion_only=cfg.data.completion_only,
            report=report,
        )
        if demonstrations
        else []
    )
    return with_answer, tokens


def _as_sft(example: Any) -> SFTExample:
    return SFTExample(prompt=example.prompt, completion=example.extra["completion"], where=example.where)


def _micro_batches(
    items: Sequence[SFTTokens], *, size: int | None, packing: bool, max_length: int, pad_id: int
) -> list[TokenBatch]:
    """Similar lengths together (sorting changes no result: the loss is a sum over tokens), or packed rows."""
    size = size or max(1, len(items))
    if packing:
        rows = pack_by_length([len(t.input_ids) for t in items], max_length=max_length)
        return [collate_packed(items, group, pad_id=pad_id) for group in chunks(rows, size)]
    ordered = sorted(items, key=lambda t: len(t.input_ids))
    return [collate_sft(group, pad_id=pad_id) for group in chunks(ordered, size)]


def _nll(model: Any, batch: TokenBatch, num_tokens: int, device: torch.device, *, bf16: bool) -> torch.Tensor:
    # packed rows too pass their mask: token_logprobs splits them into documents by their position ids,
    # and the mask tells it which tail is padding (not computed on the Llama family's unpadded path)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logp_B_T, _ = token_logprobs(
            model,
            batch.input_ids_B_T.to(device),
            batch.attention_mask_B_T.to(device),
            batch.loss_mask_B_T.to(device),
            position_ids_B_T=batch.position_ids_B_T.to(device),
        )
    return token_mean(-logp_B_T, batch.loss_mask_B_T.to(device), num_tokens=num_tokens)


def _backward_nll(model: Any, batch: TokenBatch, num_tokens: int, device: torch.device, *, bf16: bool) -> float:
    loss = _nll(model, batch, num_tokens, device, bf16=bf16)
    loss.backward()
    return loss.item()


@torch.no_grad()
def _evaluate_metrics(
    model: Any,
    tokenizer: Any,
    prompts: list[Any],
    tokens: Sequence[SFTTokens],
    reward: Any,
    cfg: SFTConfig,
    device: torch.device,
    generator: torch.Generator,
) -> tuple[dict[str, float], EvalResult | None]:
    metrics: dict[str, float] = {}
    result = None
    if tokens:
        was_training = model.training
        model.eval()
        batches = _micro_batches(
            tokens,
            size=cfg.eval.batch_size,
            packing=False,
            max_length=cfg.data.max_length,
            pad_id=tokenizer.pad_token_id,
        )
        total = sum(b.num_target_tokens for b in batches)
        metrics["eval_loss"] = sum(float(_nll(model, b, total, device, bf16=cfg.train.bf16)) for b in batches)
        model.train(was_training)
    if prompts:
        result = evaluate_with(model, tokenizer, prompts, reward, cfg.eval, generator=generator)
        metrics |= {f"eval_{k}": v for k, v in result.metrics().items()}
    return metrics, result
