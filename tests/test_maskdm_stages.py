"""MaskDM's two stages at tiny size through the real CLI under DeepSpeed (CPU, one process): pixel
encoding of a folder of images, masked pre-training with the pretrain recipe, fine-tuning from its
EMA with the finetune recipe, and unconditional samples with the official DDIM; the recipes' settings, shrunk only in
size (UViT-T/2 at 8 px, 3 steps, block 2 on the 4x4 token grid)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import REPO_ROOT, run_cli
from PIL import Image
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # launches processes: `make test-fast` leaves this module out

ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
PRETRAIN = REPO_ROOT / "pipelines" / "maskdm-celebahq256-pretrain.yaml"
FINETUNE = REPO_ROOT / "pipelines" / "maskdm-celebahq256-finetune.yaml"
TINY = ["--model", "UViT-T/2", "--steps", "3", "--micro-batch", "4", "--global-batch", "4", "--log-every", "1",
        "--num-workers", "0",
        "--precision", "fp32", "--ckpt-every", "3", "--set", "model_options.input_size=8"]


def ok(result) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


def faces(root: Path) -> Path:
    """8 random 12 px images in one folder: data without classes worth the name, encoded at 8 px."""
    rng = np.random.default_rng(0)
    folder = root / "images" / "faces"
    folder.mkdir(parents=True)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    data = root / "pixels"
    ok(run_cli("encode", str(root / "images"), str(data), "--config", str(PRETRAIN), "--resolution", "8",
               "--shard-size", "8", "--workers", "0", "--no-progress", env=ENV))
    return data


def test_pretrain_then_finetune_then_sample_through_the_cli(tmp_path: Path) -> None:
    data = faces(tmp_path)
    pretrain, finetune = tmp_path / "pretrain", tmp_path / "finetune"
    ok(run_cli("train", "--config", str(PRETRAIN), "--data", str(data), "--out", str(pretrain), *TINY,
               "--set", "objective.mask_block=2", env=ENV, timeout=300))
    ok(run_cli("train", "--config", str(FINETUNE), "--data", str(data), "--out", str(finetune), *TINY,
               "--init-from", str(pretrain), env=ENV, timeout=300))
    for run, ratio in ((pretrain, 0.9), (finetune, 0.0)):
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["objective"]["mask_ratio"] == ratio
        assert saved["diffusion"]["beta_schedule"] == "cosine"
        model = json.loads((run / "ema" / "model_config.json").read_text())
        assert (model["family"], model["num_classes"], model["input_size"]) == ("uvit", 0, 8)
        losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(line)]
        assert len(losses) == 3
        assert all(np.isfinite(losses))
    before = load_file(str(pretrain / "ema" / "model.safetensors"))
    after = load_file(str(finetune / "ema" / "model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    samples = tmp_path / "samples"
    ok(run_cli("sample", "--config", str(FINETUNE), "--ckpt", str(finetune), "--out", str(samples),
               "--num-samples", "2", "--steps", "3", "--batch-size", "2", "--precision", "fp32", env=ENV))
    assert sorted(p.name for p in samples.glob("*.png") if p.stem.isdigit()) == ["000000.png", "000001.png"]
    record = json.loads((samples / "sample_config.json").read_text())
    assert (record["sampler"], record["spacing"], record["eta"]) == ("maskdm-ddim", "linspace", 1.0)


def test_masking_settings_that_cannot_hold_stop_training_with_one_sentence(tmp_path: Path) -> None:
    """On the 4x4 token grid of 8 px images at patch 2: each refusal names the setting and the fix,
    exit status 2 (a user mistake), no run folder left behind."""
    data = faces(tmp_path)
    for setting, words in [("objective.mask_ratio=1.0", "mask ratio must be in [0, 1)"),
                           ("objective.mask_block=3", "block size 3 must divide the token grid size 4"),
                           ("objective.crop_size=5", "crop size 5 must lie in [1, 4]")]:
        extra = ["--set", "objective.masker=crop"] if "crop" in setting else []
        out = tmp_path / setting.split("=")[0]
        result = run_cli("train", "--config", str(PRETRAIN), "--data", str(data), "--out", str(out), *TINY,
                         "--set", setting, *extra, env=ENV)
        message = [line for line in result.stderr.splitlines() if line.strip()][-1]
        assert result.returncode == 2, result.stderr[-2000:]
        assert words in message, result.stderr[-2000:]
        assert not out.exists()
