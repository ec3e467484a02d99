"""Fixtures shared across test folders."""

import pytest

import posttrain.policies.logprobs as logprobs_module


@pytest.fixture
def unpadded_calls(monkeypatch):
    """How many times the unpadded training forward ran (`llama_forward.unpadded_hidden_states`)."""
    count = {"n": 0}
    original = logprobs_module.unpadded_hidden_states

    def counting(*args, **kwargs):
        count["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(logprobs_module, "unpadded_hidden_states", counting)
    return count
