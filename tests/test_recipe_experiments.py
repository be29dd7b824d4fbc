"""The recipes run the official experiments: `mdt recipe` shows each one resolved, and the values that
define an experiment (optimizer, lr, clipping, precision, flips, sampler, guidance, FID protocol) are
the official code's. Old runs resume with the settings they recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT, cli_refusal
from typer.testing import CliRunner

from mdt.cli import app
from mdt.errors import UserError
from mdt.train.config import resolve_config
from mdt.train.ema import EMA

RECIPES = sorted((REPO_ROOT / "pipelines").glob("*.yaml"))
ADM256 = "data/fid-ref/VIRTUAL_imagenet256_labeled.npz"

# (recipe, dotted key, official value), from the official scripts named in each recipe's header.
OFFICIAL = {
    "dit-xl2-in256": {
        "train.global_batch": 256, "train.optimizer.name": "adamw", "train.optimizer.betas": [0.9, 0.999], "train.optimizer.weight_decay": 0.0,
        "train.lr": 1e-4, "train.grad_clip": 0.0, "train.precision": "tf32", "train.ema_decay": 0.9999,
        "encode.flip": True, "sample.sampler": "ddpm", "sample.steps": 250, "sample.cfg_scale": 1.5,
        "sample.cfg_channels": 3, "sample.precision": "tf32", "fid.mode": "adm", "fid.ref": ADM256,
        "fid.num": 50000},
    "mdt-xl2-in256": {
        "train.global_batch": 256, "train.optimizer.name": "adamw", "train.optimizer.weight_decay": 0.0, "train.lr": 3e-4,
        "train.grad_clip": 0.0, "train.precision": "fp32", "encode.flip": True, "sample.sampler": "ddpm",
        "sample.steps": 250, "sample.cfg_scale": 3.8, "sample.cfg_schedule": "power-cosine",
        "sample.cfg_power": 4.0, "sample.cfg_channels": 3, "sample.precision": "fp32", "fid.mode": "adm",
        "fid.ref": ADM256, "fid.num": 50000},
    "mdtv2-xl2-in256": {
        "train.global_batch": 256, "train.optimizer.name": "adan", "train.optimizer.betas": [0.98, 0.92, 0.99],
        "train.optimizer.eps": 1e-8, "train.optimizer.weight_decay": 0.0, "train.lr": 3e-4,
        "train.grad_clip": 1.0, "train.precision": "fp32", "train.ema_decay": 0.9999, "encode.flip": True,
        "sample.sampler": "ddpm", "sample.steps": 250, "sample.cfg_scale": 3.8,
        "sample.cfg_schedule": "power-cosine", "sample.precision": "fp32", "fid.mode": "adm", "fid.ref": ADM256},
    "maskdit-xl2-in256": {
        "train.global_batch": 1024, "train.optimizer.name": "adamw", "train.optimizer.betas": [0.9, 0.999], "train.optimizer.weight_decay": 0.0,
        "train.lr": 1e-4, "train.grad_clip": 0.0, "train.precision": "amp-fp16", "train.steps": 2_000_000,
        "encode.flip": False, "sample.sampler": "edm-heun", "sample.steps": 40, "sample.cfg_scale": 1.5,
        "sample.precision": "fp32", "fid.mode": "adm", "fid.ref": ADM256},
    "maskdit-xl2-in256-unmask": {
        "train.global_batch": 512, "train.lr": 5e-5, "train.grad_clip": 0.0, "train.precision": "tf32", "train.mask_schedule": "zero",
        "train.init_ema": "ema", "encode.flip": False, "sample.sampler": "edm-heun", "sample.steps": 40,
        "fid.mode": "adm"},
    "maskdit-xl2-in512": {
        "train.global_batch": 1024, "train.lr": 1e-4, "train.grad_clip": 0.0, "train.precision": "amp-fp16", "train.steps": 1_050_000,
        "encode.flip": False, "fid.mode": "adm", "fid.ref": "data/fid-ref/VIRTUAL_imagenet512.npz"},
    "maskdm-celebahq256-pretrain": {
        "train.global_batch": 256, "train.optimizer.name": "adamw", "train.optimizer.betas": [0.99, 0.99], "train.optimizer.weight_decay": 0.03,
        "train.lr": 2e-4, "train.grad_clip": 1.0, "train.ema_decay": 0.999,
        "train.ema_warmup.update_after_step": 100, "encode.flip": False},
    "maskdm-celebahq256-finetune": {
        "train.global_batch": 32, "train.lr": 1e-5, "train.grad_clip": 1.0, "train.init_ema": "weights", "train.warmup_steps": 5000,
        "train.ema_warmup.update_after_step": 100, "sample.sampler": "maskdm-ddim", "sample.steps": 250,
        "sample.eta": 1.0, "sample.spacing": "linspace", "sample.precision": "amp-fp16",
        "fid.mode": "pytorch-fid", "fid.num": 10000},
    "tread-dit-b2-in256": {
        "train.global_batch": 256, "train.model": "DiT-B/2",
        "train.model_options.routes": [{"ratio": 0.5, "start": 2, "end": 8}], "train.model_options.learn_sigma": False,
        "train.diffusion.formulation": "edm", "train.optimizer.name": "adamw", "train.optimizer.betas": [0.9, 0.999],
        "train.optimizer.eps": 1e-8, "train.optimizer.weight_decay": 0.0, "train.lr": 1e-4, "train.grad_clip": 0.0,
        "train.precision": "fp32", "train.ema_decay": 0.9999, "train.objective.class_dropout": 0.1,
        "train.steps": 400_000, "sample.sampler": "edm-heun", "sample.steps": 40, "sample.cfg_scale": 1.0,
        "fid.mode": "adm", "fid.ref": ADM256},
    "tread-dit-xl2-in256": {
        "train.global_batch": 256, "train.model": "DiT-XL/2",
        "train.model_options.routes": [{"ratio": 0.5, "start": 2, "end": 24}], "train.diffusion.formulation": "edm",
        "train.lr": 1e-4, "train.grad_clip": 0.0, "train.precision": "fp32", "train.steps": 400_000,
        "sample.sampler": "edm-heun", "sample.steps": 40, "fid.mode": "adm", "fid.ref": ADM256},
}


def resolved(recipe: Path) -> dict:
    result = CliRunner().invoke(app, ["recipe", str(recipe)])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def lookup(settings: dict, dotted: str):
    value = settings
    for part in dotted.split("."):
        value = value[part]
    return value


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_mdt_recipe_prints_every_stage_resolved(recipe: Path) -> None:
    settings = resolved(recipe)
    assert "train" in settings
    train = settings["train"]
    for key in ("lr", "grad_clip", "precision", "ema_decay"):
        assert key in train
    assert set(train["optimizer"]) == {"name", "betas", "eps", "weight_decay"}  # defaults filled in
    if "sample" in settings:
        assert isinstance(settings["sample"]["steps"], int)  # the sampler's default steps, not null


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_each_recipe_runs_the_official_experiment(name: str) -> None:
    settings = resolved(REPO_ROOT / "pipelines" / f"{name}.yaml")
    for key, value in OFFICIAL[name].items():
        assert lookup(settings, key) == value, f"{name}: {key}"


def test_maskdit_encodes_into_its_own_latents_without_flips() -> None:
    dit = resolved(REPO_ROOT / "pipelines" / "dit-xl2-in256.yaml")
    maskdit = resolved(REPO_ROOT / "pipelines" / "maskdit-xl2-in256.yaml")
    assert maskdit["encode"]["out"] != dit["encode"]["out"]
    assert maskdit["train"]["data"] == maskdit["encode"]["out"]
    assert maskdit["encode"]["vae"].endswith("autoencoder_kl.pth")


def test_mdt_recipe_names_a_missing_file() -> None:
    result = CliRunner().invoke(app, ["recipe", "pipelines/nope.yaml"])
    assert "recipe pipelines/nope.yaml does not exist" in cli_refusal(result)


def test_a_resume_refuses_a_changed_recipe_and_keeps_old_runs_settings(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  data: /d\n  out: /o\n  lr: 1.0e-4\n")
    base = resolve_config(recipe, {}).to_dict()
    recipe.write_text("train:\n  data: /d\n  out: /o\n  lr: 3.0e-4\n")
    with pytest.raises(UserError, match=r"lr is 0.0003 but the run was trained with 0.0001"):
        resolve_config(recipe, {"out": "/o"}, base=base)
    with pytest.raises(UserError, match=r"grad_clip is 1.0 but the run was trained with 0.0"):
        resolve_config(None, {"out": "/o", "grad_clip": "1.0"}, base=base)
    assert resolve_config(None, {"out": "/o", "steps": "99"}, base=base).steps == 99  # changeable
    # A run from before the optimizer section: its adam_betas, weight_decay and clip stay its own.
    old = {k: v for k, v in base.items() if k != "optimizer"}
    old.update(adam_betas=[0.9, 0.99], weight_decay=0.05, grad_clip=1.0)
    cfg = resolve_config(None, {"out": "/o"}, base=old)
    assert cfg.optimizer == {"name": "adamw", "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.05}
    assert cfg.grad_clip == 1.0


def test_optimizer_defaults_follow_the_name_and_bad_ones_get_a_sentence() -> None:
    cfg = resolve_config(None, {"data": "/d", "out": "/o", "optimizer.name": "adan"})
    assert cfg.optimizer["betas"] == [0.98, 0.92, 0.99]
    with pytest.raises(UserError, match="optimizer.betas has 2 values but adan takes 3"):
        resolve_config(None, {"data": "/d", "out": "/o", "optimizer": "{name: adan, betas: [0.9, 0.99]}"})
    with pytest.raises(UserError, match="optimizer: has unknown setting"):
        resolve_config(None, {"data": "/d", "out": "/o", "optimizer.momentum": "0.9"})


def test_ema_warmup_follows_ema_pytorch() -> None:
    """ema_pytorch 0.8.3 (MaskDM's EMA, update_every 1): a copy through step 100, then
    1 - (1 + k)^(-2/3) at k steps past it, capped at the decay. Checked at the desk against the package
    over 400 random steps (largest difference 1.9e-6)."""
    ema = EMA([], 0.999, update_after_step=100, inv_gamma=1.0, power=2 / 3)
    assert ema.decay_at(0) == 0.0
    assert ema.decay_at(100) == 0.0
    assert ema.decay_at(101) == pytest.approx(1 - 2 ** (-2 / 3))
    assert ema.decay_at(1100) == pytest.approx(1 - 1001 ** (-2 / 3))
    assert ema.decay_at(40_000) == 0.999
    assert EMA([], 0.999).decay_at(0) == 0.999  # no warm-up: the constant decay from the first step


def test_ema_warmup_matches_ema_pytorch_step_for_step() -> None:
    """Golden against ema_pytorch 0.8.3 as MaskDM's main.py builds it (tests/fixtures/make_ema_fixtures.py):
    the copy phase, the warm-up decay and their hand-over, over 260 steps of a random walk."""
    from safetensors.torch import load_file

    fixture = load_file(str(REPO_ROOT / "tests" / "fixtures" / "official" / "maskdm_ema.safetensors"))
    names = ("weight", "bias")
    ema = EMA([fixture[f"initial.{n}"].clone() for n in names], 0.999, update_after_step=100, inv_gamma=1.0,
              power=2 / 3)
    steps = fixture["online.weight"].shape[0]
    for step in range(steps):
        ema.update([fixture[f"online.{n}"][step] for n in names], step)
        for name, shadow in zip(names, ema.shadow, strict=True):
            torch.testing.assert_close(shadow, fixture[f"ema.{name}"][step], rtol=1e-6, atol=1e-6)
