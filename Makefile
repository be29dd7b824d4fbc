# mdt: user-facing targets. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MDT := $(VENV)/bin/mdt
# torch/torchvision pins that match the wheels this project is tested with.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

# Sampling and FID (override on the command line: make sample CKPT=runs/xl OUT=samples/xl N=50000).
CKPT ?= runs/latest
OUT ?= samples/latest
N ?= 50000
CFG ?= 1.5
SAMPLER ?= ddpm
STEPS ?= 250
NPROC ?= 1
REF ?= fid_refs/imagenet256.npz
ifeq ($(NPROC),1)
MDT_RUN := $(PY) -m mdt.cli
else
MDT_RUN := $(VENV)/bin/torchrun --nproc_per_node $(NPROC) -m mdt.cli
endif

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

sample: setup ## sample N images from CKPT into OUT (CFG, SAMPLER, STEPS; NPROC>1 uses torchrun)
	$(MDT_RUN) sample --ckpt $(CKPT) --out $(OUT) --num-samples $(N) --cfg-scale $(CFG) --sampler $(SAMPLER) --steps $(STEPS)

fid: setup ## FID/KID of the samples in OUT against REF (stats .npz or image folder); writes OUT/metrics.json
	$(PY) -m mdt.cli fid --samples $(OUT) --ref $(REF) --num $(N)

.PHONY: help setup test lint sample fid
