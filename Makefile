# mdt: user-facing targets. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MDT := $(VENV)/bin/mdt
# torch/torchvision pins that match the wheels this project is tested with.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.DEFAULT_GOAL := help

# Multi-process launch: NPROC processes per node (one GPU each); with HOSTFILE, NODES nodes through
# the DeepSpeed launcher. NPROC=1 and no HOSTFILE runs a plain single process.
NPROC ?= 1
NODES ?= 1
HOSTFILE ?=
ifneq ($(strip $(HOSTFILE)),)
LAUNCH = $(VENV)/bin/deepspeed --hostfile $(HOSTFILE) --num_nodes $(NODES) --num_gpus $(NPROC) --module mdt.cli
else ifneq ($(NPROC),1)
LAUNCH = $(PY) -m torch.distributed.run --standalone --nproc_per_node $(NPROC) -m mdt.cli
else
LAUNCH = $(PY) -m mdt.cli
endif

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

# encode-latents: DATA and OUT are required; the rest default to the paper setting (256 px, SD-VAE).
RES ?= 256
VAE ?= stabilityai/sd-vae-ft-ema
FLIP ?= 0
BATCH ?= 32
WORKERS ?=
ENCODE_ARGS = "$(DATA)" "$(OUT)" --resolution $(RES) --vae "$(VAE)" --batch-size $(BATCH) \
	$(if $(filter 1 yes true,$(FLIP)),--flip) $(if $(WORKERS),--workers $(WORKERS))

encode-latents: setup ## encode DATA (image folder or tars) to latent shards in OUT; RES VAE NPROC FLIP=1 BATCH WORKERS
	@test -n "$(DATA)" -a -n "$(OUT)" || { echo "error: pass DATA=<image folder or tar shards> OUT=<output folder>" >&2; exit 2; }
	$(LAUNCH) encode $(ENCODE_ARGS)


# Training: a recipe (PIPELINE=pipelines/x.yaml) and/or flags; flags win. RESUME=RUN continues a run.
train: setup ## train with DeepSpeed: PIPELINE= or DATA= MODEL= OUT=, [DS_CONFIG= STEPS= RESUME= NPROC= NODES= HOSTFILE=]
	$(LAUNCH) train $(if $(PIPELINE),--config $(PIPELINE)) $(if $(DATA),--data $(DATA)) \
		$(if $(MODEL),--model $(MODEL)) $(if $(OUT),--out $(OUT)) $(if $(DS_CONFIG),--deepspeed-config $(DS_CONFIG)) \
		$(if $(STEPS),--steps $(STEPS)) $(if $(RESUME),--resume $(RESUME)) $(TRAIN_ARGS)

bench-model: setup ## forward+backward throughput of every family (tools/bench_model.py, JSON lines)
	$(PY) tools/bench_model.py $(BENCH_ARGS)

bench-train: setup ## whole training-step throughput (tools/bench_train.py, JSON lines)
	$(PY) tools/bench_train.py $(BENCH_ARGS)

# Sampling and FID: make sample CKPT=runs/xl OUT=samples/xl [N= CFG= SAMPLER= STEPS= NPROC=];
# STEPS empty uses the sampler's default (250 ddpm, 50 ddim, 25 dpm++).
N ?= 50000
CFG ?= 1.5
SAMPLER ?= ddpm
sample: setup ## sample N images from CKPT into OUT (CFG, SAMPLER, STEPS; NPROC>1 uses torchrun)
	$(LAUNCH) sample --ckpt $(or $(CKPT),$(error set CKPT=run or export folder)) \
		--out $(or $(OUT),$(error set OUT=output folder)) --num-samples $(N) --cfg-scale $(CFG) \
		--sampler $(SAMPLER) $(if $(STEPS),--steps $(STEPS)) $(SAMPLE_ARGS)

fid: setup ## FID/KID of the samples in OUT against REF (stats .npz or image folder); writes OUT/metrics.json
	$(PY) -m mdt.cli fid --samples $(or $(OUT),$(error set OUT=samples folder or npz)) \
		--ref $(or $(REF),$(error set REF=stats .npz or image folder)) --num $(N) $(FID_ARGS)

.PHONY: help setup test lint encode-latents train bench-model bench-train sample fid
