"""A learned reward: a sequence-classification model that scores prompt + completion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class RewardModelScorer:
    """Scores each prompt + completion with `AutoModelForSequenceClassification` (logit 0), no grad.

    Args: `path` (a local model directory; relative paths are tried against the recipe's directory,
    then the working directory), `batch_size` (sequences per forward), `device` ("cpu", "cuda", ...),
    `max_length` (truncate longer texts; None keeps them whole), `add_special_tokens` (False by default,
    as TRL's GRPOTrainer scores reward-model inputs).

    Text prompts are concatenated with their completions; conversations are rendered with the reward
    model's chat template (prompt messages + completion messages), as TRL does. Texts are sorted by
    length before batching so a batch pads to similar lengths; scores come back in input order.
    """

    __name__ = "reward_model"

    def __init__(
        self,
        *,
        path: str,
        batch_size: int = 8,
        device: str = "cpu",
        max_length: int | None = None,
        add_special_tokens: bool = False,
        base_dir: str | Path | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"reward 'reward_model': batch_size must be >= 1, got {batch_size}")
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model_dir = _resolve_model_dir(path, base_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).to(device).eval()
        _ensure_pad_token(self.tokenizer, self.model, model_dir)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.max_length = max_length
        self.add_special_tokens = add_special_tokens

    def __call__(self, *, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        texts = [self._render(p, c) for p, c in zip(prompts, completions, strict=True)]
        return self.score_texts(texts).tolist()

    def score_texts(self, texts: list[str]) -> torch.Tensor:
        """Logit 0 of each text, float32 on CPU, shape [N]."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        scores_N = torch.empty(len(texts), dtype=torch.float32)
        for start in range(0, len(order), self.batch_size):
            index_B = order[start : start + self.batch_size]
            scores_N[index_B] = self._score_batch([texts[i] for i in index_B])
        return scores_N

    @torch.inference_mode()
    def _score_batch(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            padding_side="right",
            truncation=self.max_length is not None,
            max_length=self.max_length,
            add_special_tokens=self.add_special_tokens,
        ).to(self.device)
        logits_B_C = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits_B_C[:, 0].float().cpu()

    def _render(self, prompt: Any, completion: Any) -> str:
        if isinstance(prompt, str) and isinstance(completion, str):
            return prompt + completion
        messages = _as_messages(prompt) + _as_messages(completion)
        return self.tokenizer.apply_chat_template(messages, tokenize=False)


def _as_messages(part: Any) -> list[dict[str, Any]]:
    if isinstance(part, str):
        return [{"role": "user", "content": part}]
    return list(part)


def _resolve_model_dir(path: str, base_dir: str | Path | None) -> Path:
    candidate = Path(path).expanduser()
    tried = [candidate] if candidate.is_absolute() else [Path(base_dir or ".") / candidate, Path.cwd() / candidate]
    for model_dir in tried:
        if model_dir.is_dir():
            return model_dir
    looked = ", ".join(str(p) for p in tried)
    raise FileNotFoundError(f"reward 'reward_model': model directory '{path}' not found (looked in {looked})")


def _ensure_pad_token(tokenizer: Any, model: Any, model_dir: Path) -> None:
    # Sequence-classification heads pick each row's last non-pad token by comparing ids with
    # config.pad_token_id, so batching needs both the tokenizer and the config to know the pad id.
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"reward 'reward_model': tokenizer in {model_dir} has neither a pad nor an eos token; "
                "set pad_token in its tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token
    text_config = model.config.get_text_config()
    if text_config.pad_token_id is None:
        text_config.pad_token_id = tokenizer.pad_token_id
