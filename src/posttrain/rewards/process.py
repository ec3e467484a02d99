"""Per-step rewards from a process reward model (PRM), delivered to the token where each step ends (issue #26.4).

A PRM trained by `posttrain rm` with a stepwise loss (`process_bce`) is a token classifier whose logit at a step's
last token is log-odds that the step is right. In RL (`rl.process_reward`), a sampled completion's steps end at
each occurrence of the step separator among the model's tokens and at its last model token; the PRM's
p_k = sigmoid(logit) at those tokens is refined so that the trajectory's process return stays bounded (Gao et al.
2024, arXiv:2410.15115):

    none:   r_k = p_k
    clip:   r_k = min(p_k - eta, 0)           (objectives.process_rewards.clip_step_rewards)
    delta:  r_k = p_k - p_{k+1}, r_K = 0      (objectives.process_rewards.delta_step_rewards)

and coef * r_k goes to step k's last token, beside the outcome reward on the last token: an estimator that reads
token rewards (GAE, REINFORCE++, turn_returns) credits each step with what follows it; one that reads sequence
rewards sees their sum. An estimator that takes process rewards apart from the outcome (PRIME's `prime`) gets them
as `process_rewards_B_T` instead.

An implicit PRM (Yuan et al. 2024, "Free Process Rewards without Process Labels", arXiv:2412.01981;
`rl.process_reward.kind: implicit`) is a causal LM trained with `implicit_prm` on outcome labels, scored against
the reference it was trained from: step k's reward is the sum of its tokens' beta * log pi(y_t|y_<t) / ref(y_t|y_<t)
(`step_rewards_from_tokens`), q_k - q_{k-1} in the paper's Q values, delivered to the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from posttrain.objectives.process_rewards import (
    clip_step_rewards,
    delta_step_rewards,
    implicit_token_rewards,
    step_rewards_from_tokens,
)
from posttrain.policies.heads import token_scores
from posttrain.policies.logprobs import token_logprobs
from posttrain.policies.models import load_model, load_tokenizer
from posttrain.runtime.model_files import holds_tokenizer

REFINEMENTS: dict[str, Callable[..., Tensor]] = {
    "none": lambda p_B_T, end_B_T, *, eta: torch.where(end_B_T, p_B_T, 0.0),
    "clip": clip_step_rewards,
    "delta": lambda p_B_T, end_B_T, *, eta: delta_step_rewards(p_B_T, end_B_T),
}
"""rl.process_reward.refinement -> (step scores [B, T], step ends [B, T], eta) -> step rewards [B, T]."""


def step_ends(input_ids_B_T: Tensor, mask_B_T: Tensor, separator_ids: list[int]) -> Tensor:
    """Bool [B, T]: the model tokens that end a step, the last token of each occurrence of `separator_ids` whose
    tokens the model wrote, and each row's last model token (the last step needs no separator after it)."""
    ends_B_T = torch.zeros_like(mask_B_T)
    width = len(separator_ids)
    if width:
        separator = torch.tensor(separator_ids, device=input_ids_B_T.device)
        windows_B_T_W = input_ids_B_T.unfold(1, width, 1)  # token t .. t + width - 1
        written_B_T_W = mask_B_T.unfold(1, width, 1)
        match_B_T = ((windows_B_T_W == separator) & written_B_T_W).all(dim=-1)
        ends_B_T[:, width - 1 :] = match_B_T
    positions_B_T = torch.arange(mask_B_T.shape[1], device=mask_B_T.device).expand_as(mask_B_T)
    last_B = torch.where(mask_B_T, positions_B_T, -1).amax(dim=1)
    ends_B_T |= (positions_B_T == last_B[:, None]) & mask_B_T
    return ends_B_T


def refined_step_rewards(logits_B_T: Tensor, ends_B_T: Tensor, *, refinement: str, eta: float,
                         coef: float) -> Tensor:  # fmt: skip
    """coef times the refined step rewards of a PRM's logits, at the step ends [B, T]; 0 elsewhere."""
    return coef * REFINEMENTS[refinement](torch.sigmoid(logits_B_T.float()), ends_B_T, eta=eta)


def check_same_tokenizer(path: str | Path, tokenizer: Any, key: str) -> None:
    """A model that scores the policy's token ids must share its tokenizer (when its directory holds one)."""
    if holds_tokenizer(path) and load_tokenizer(path, key).get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"{key}: {path} has another tokenizer than the policy's; the model scores the policy's "
                         "token ids, so it must share the policy's tokenizer")  # fmt: skip


class ProcessRewardScorer:
    """The PRM of `rl.process_reward`: scores episodes' token ids (the policy's tokenizer, so the PRM must share it)
    and gives each step's refined reward at its last token (module docstring)."""

    def __init__(self, *, path: str | Path, tokenizer: Any, step_separator: str, refinement: str, eta: float,
                 coef: float, device: torch.device, batch_size: int | None = None) -> None:  # fmt: skip
        from transformers import AutoModelForTokenClassification

        key = "rl.process_reward.path"
        check_same_tokenizer(path, tokenizer, key)
        self.model = AutoModelForTokenClassification.from_pretrained(path, local_files_only=True).to(device).eval()
        labels = self.model.config.num_labels
        if labels != 1:
            raise ValueError(f"{key}: {path} is a token classifier with {labels} labels; a PRM of `posttrain rm` "
                             "(loss process_bce) has one")  # fmt: skip
        self.separator_ids = tokenizer(step_separator, add_special_tokens=False)["input_ids"] if step_separator else []
        self.refinement, self.eta, self.coef, self.batch_size = refinement, eta, coef, batch_size

    @torch.no_grad()
    def __call__(self, input_ids_B_T: Tensor, attention_mask_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
        """[B, T] float32: each step's reward at its last model token, 0 elsewhere."""
        ends_B_T = step_ends(input_ids_B_T, mask_B_T, self.separator_ids)
        size = self.batch_size or len(input_ids_B_T)
        logits = []
        for start in range(0, len(input_ids_B_T), size):
            rows = slice(start, start + size)
            every_B_T = torch.ones_like(attention_mask_B_T[rows])
            logits.append(token_scores(self.model, input_ids_B_T[rows], attention_mask_B_T[rows], every_B_T)
                          .view(every_B_T.shape))  # fmt: skip
        return refined_step_rewards(torch.cat(logits), ends_B_T, refinement=self.refinement, eta=self.eta,
                                    coef=self.coef)  # fmt: skip


class ImplicitProcessRewardScorer:
    """The implicit PRM of `rl.process_reward` (kind implicit): a causal LM and its reference, both sharing the
    policy's tokenizer; each step's reward is the sum of its tokens' implicit rewards, at its last token (module
    docstring)."""

    def __init__(self, *, path: str | Path, reference: str | Path, tokenizer: Any, step_separator: str, beta: float,
                 coef: float, device: torch.device, batch_size: int | None = None) -> None:  # fmt: skip
        for key, directory in (("rl.process_reward.path", path), ("rl.process_reward.reference", reference)):
            check_same_tokenizer(directory, tokenizer, key)
        self.model = load_model(path, device=device).eval()
        self.reference = load_model(reference, device=device).eval()
        self.separator_ids = tokenizer(step_separator, add_special_tokens=False)["input_ids"] if step_separator else []
        self.beta, self.coef, self.batch_size = beta, coef, batch_size

    @torch.no_grad()
    def __call__(self, input_ids_B_T: Tensor, attention_mask_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
        """[B, T] float32: each step's summed implicit token rewards at its last model token, 0 elsewhere."""
        ends_B_T = step_ends(input_ids_B_T, mask_B_T, self.separator_ids)
        size = self.batch_size or len(input_ids_B_T)
        rewards = []
        for start in range(0, len(input_ids_B_T), size):
            ids, real, mask = (x[start : start + size] for x in (input_ids_B_T, attention_mask_B_T, mask_B_T))
            logp_B_T = token_logprobs(self.model, ids, real, mask)[0]
            ref_logp_B_T = token_logprobs(self.reference, ids, real, mask)[0]
            rewards.append(implicit_token_rewards(logp_B_T, ref_logp_B_T, mask, beta=self.beta))
        return self.coef * step_rewards_from_tokens(torch.cat(rewards), ends_B_T)
