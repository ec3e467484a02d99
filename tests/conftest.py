"""Fixtures shared across test folders."""

import pytest

import posttrain.policies.logprobs as logprobs_module
from posttrain.policies import cpu_matmul, unpadded


@pytest.fixture
def unpadded_calls(monkeypatch):
    """How many times the unpadded training forward ran (`unpadded.unpadded_hidden_states`)."""
    count = {"n": 0}
    original = logprobs_module.unpadded_hidden_states

    def counting(*args, **kwargs):
        count["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(logprobs_module, "unpadded_hidden_states", counting)
    return count


@pytest.fixture(params=["blas", "onednn"])
def linear_kernel(request, monkeypatch):
    """Runs a test with the float32 CPU linear layers on the default BLAS, then with every product on oneDNN,
    small ones too, so that the unpadded forward pads its rows (`unpadded.products_pad_rows`). Yields
    {"kernel": the choice, "padded": how many unpadded forwards padded their rows}."""
    if request.param == "onednn":
        if not cpu_matmul.onednn_available():
            pytest.skip("no oneDNN linear in this build")
        monkeypatch.setattr(cpu_matmul, "MIN_ROWS", 1)
        monkeypatch.setattr(cpu_matmul, "MIN_MULTIPLY_ADDS", 0)
        monkeypatch.setattr(cpu_matmul, "MIN_WEIGHT_VALUES", 0)
    monkeypatch.setenv(cpu_matmul.ENV_VAR, request.param)
    cpu_matmul.onednn_selected.cache_clear()
    seen = {"kernel": request.param, "padded": 0}
    original = unpadded.products_pad_rows

    def counting(*args):
        pads = original(*args)
        seen["padded"] += pads
        return pads

    monkeypatch.setattr(unpadded, "products_pad_rows", counting)
    yield seen
    cpu_matmul.onednn_selected.cache_clear()
