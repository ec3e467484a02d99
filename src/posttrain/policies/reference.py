"""The reference a KL term or an implicit reward compares the policy with: the initial policy, frozen.

    reference = build_reference(policy)
    with reference.active():
        ref_logp_B_T = token_logprobs(reference.model, ...)

A full-weight policy gets a frozen copy. A LoRA policy needs no copy: its base model, with the adapters switched
off, is the initial policy (TRL does the same), so `reference.model` is the policy itself and `active()` switches
its adapters off for the duration. `refresh(policy)` makes the policy's present weights the reference (online
preference's `refresh` rounds): a copy's weights are overwritten; a LoRA policy keeps a second, frozen adapter
that the policy's adapter is copied into.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch

from posttrain.policies.models import is_lora

REFERENCE_ADAPTER = "reference"
"""The frozen adapter a LoRA policy's reference switches to after a `refresh`."""


class FrozenCopy:
    """A copy of the initial policy that never trains (eval mode, no gradients)."""

    def __init__(self, policy: Any) -> None:
        self.model = copy.deepcopy(policy).eval()
        self.model.requires_grad_(False)

    def active(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    @torch.no_grad()
    def refresh(self, policy: Any) -> None:
        self.model.load_state_dict(policy.state_dict())


class AdapterOff:
    """A LoRA policy's own base model as its reference: no second copy of the weights."""

    def __init__(self, policy: Any) -> None:
        self.model = policy
        self.refreshed = False

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        if not self.refreshed:
            with self.model.disable_adapter():
                yield
            return
        trained = self.model.active_adapter
        self.model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
        try:
            yield
        finally:
            self.model.set_adapter(trained)

    @torch.no_grad()
    def refresh(self, policy: Any) -> None:
        """Copy the policy's adapter into the frozen reference adapter (made on the first refresh)."""
        trained = policy.active_adapter
        if REFERENCE_ADAPTER not in policy.peft_config:
            policy.add_adapter(REFERENCE_ADAPTER, copy.deepcopy(policy.peft_config[trained]))
        for name, parameter in policy.named_parameters():
            parts = name.split(".")
            if REFERENCE_ADAPTER in parts:
                source = ".".join(trained if part == REFERENCE_ADAPTER else part for part in parts)
                parameter.copy_(policy.get_parameter(source))
                parameter.requires_grad_(False)
        self.refreshed = True


Reference = FrozenCopy | AdapterOff


def build_reference(policy: Any) -> Reference:
    """The reference of `policy` as it is now (call it before any training or checkpoint weights are loaded)."""
    return AdapterOff(policy) if is_lora(policy) else FrozenCopy(policy)
