"""A scripted policy: an engine whose every completion is chosen by a function of its context, no model needed."""

from collections.abc import Callable

import torch

from posttrain.rollout import Rollouts


class ScriptedEngine:
    """`reply(context_ids) -> completion ids`; each token's log-prob is -0.5 so that masks are visible in sums.
    Records every call's contexts."""

    def __init__(self, reply: Callable[[list[int]], list[int]]) -> None:
        self.reply, self.calls = reply, []

    def generate(self, model, prompt_ids, params, *, n, generator=None, tokenizer=None) -> Rollouts:
        self.calls.append([list(p) for p in prompt_ids])
        completions = [list(self.reply(list(p))) for p in prompt_ids for _ in range(n)]
        logprobs = [torch.full((len(c),), -0.5) for c in completions]
        reasons = ["stop"] * len(completions)
        return Rollouts([list(p) for p in prompt_ids], completions, logprobs, reasons, group_size=n)


class NoModel:
    """Stands in for the policy: run_episodes only switches its mode."""

    training = False

    def eval(self):
        return self

    def train(self, mode=True):
        return self


class TurnScript:
    """An engine playing one episode: its k-th call samples texts[k] (then EOS); records contexts and samples."""

    def __init__(self, tokenizer, texts):
        self.tokenizer, self.texts, self.calls, self.sampled = tokenizer, texts, [], []

    def generate(self, model, prompt_ids, params, *, n, generator=None, tokenizer=None):
        assert len(prompt_ids) * n == 1
        ids = self.tokenizer(self.texts[len(self.calls)], add_special_tokens=False)["input_ids"]
        ids = [*ids, self.tokenizer.eos_token_id]
        self.calls.append(list(prompt_ids[0]))
        self.sampled.append(ids)
        return Rollouts([list(prompt_ids[0])], [ids], [torch.full((len(ids),), -1.0)], ["stop"], group_size=1)
