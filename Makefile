# mdt: user-facing targets. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MDT := $(VENV)/bin/mdt
# torch/torchvision pins that match the wheels this project is tested with.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-16s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIN)
	# DeepSpeed builds from source: reuse the installed torch and build no ops ahead of time.
	$(PY) -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation "deepspeed>=0.15"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed ## create .venv and install mdt with its dev extra (idempotent)

test: setup ## run the CPU test suite
	$(PY) -m pytest -q

lint: setup ## ruff over the package, tools and tests
	$(VENV)/bin/ruff check mdt tools tests

.PHONY: help setup test lint
