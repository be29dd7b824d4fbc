"""Every `mdt import` path records the diffusion its source code base trained with, and samples through
`mdt sample`: DiT, MDT (v1), MDTv2 and diffusers DiT folders DDPM, MaskDM DDPM on cosine betas,
MaskDiT EDM. An imported official MaskDiT training checkpoint samples with edm-heun, guided, as the
official edm_sampler does (tests/fixtures/official/maskdit_loss_sampler.safetensors)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from golden_helpers import (
    assert_trajectory_close,
    load_fixture,
    mdt_import,
    official_state_dict,
    released_layout,
    weights,
    write_source,
)
from helpers import cli_refusal
from PIL import Image
from typer.testing import CliRunner

from mdt.checkpoints.export_folder import read_checkpoint
from mdt.cli import app
from mdt.models import load_pretrained, save_pretrained
from mdt.models.embeddings import sincos_pos_embed_2d
from mdt.sample.config import DEFAULT_STEPS, SampleConfig
from mdt.sample.guidance import ClassifierFreeGuidance, GuidanceConfig
from mdt.sample.run import _validate
from mdt.sample.samplers import SAMPLERS, Churn

# DiT's create_diffusion defaults, which MDT and MDTv2 keep: what their checkpoints were trained with.
DIT_DDPM = {"formulation": "ddpm", "num_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4,
            "beta_end": 0.02, "prediction_type": "epsilon", "learn_sigma": True}
# family -> (--model, --set options, the sampler its own code evaluates with)
FAMILIES = {"dit": ("DiT", ["num_heads=4"], "ddpm"), "mdtv1": ("MDT", ["decoder_depth=2"], "ddim"),
            "mdtv2": ("MDTv2", [], "dpm++"), "maskdit": ("MaskDiT", ["num_heads=4", "decoder_num_heads=2"], "edm-heun"),
            "maskdm": ("UViT", ["num_heads=2"], "maskdm-ddim"), "diffusers": ("DiT", [], "ddim")}
NULL_LABEL = 10  # the MaskDiT fixture's 10 classes; its all-zero one-hot row is the null label


def maskdit_training_checkpoint(path: Path) -> Path:
    """The dict MaskDiT's train.py saves (model, ema, opt, args): EDMPrecond state_dicts, keys model.*."""
    tensors, _ = load_fixture("maskdit")
    ema = official_state_dict(tensors)
    live = {k: v + 1.0 for k, v in ema.items()}  # import must take 'ema', not the live weights
    args = argparse.Namespace(config="configs/train/maskdit-imagenet.yaml", results_dir="results", ckpt_path=None,
                              global_seed=0, cfg_scale=None, num_steps=40, S_churn=0)
    torch.save({"model": live, "ema": ema, "opt": {"state": {}, "param_groups": []}, "args": args}, path)
    return path


def source_of(family: str, directory: Path, vae: Path) -> Path:
    """A checkpoint in the layout the family's own code saves (diffusers: `mdt export` of a DiT import)."""
    if family == "maskdit":
        return maskdit_training_checkpoint(directory / "0100000.pt")
    if family == "maskdm":
        tensors, _ = load_fixture("maskdm")
        buffers = weights(load_fixture("maskdm_loss")[0], "diffusion.")
        torch.save(released_layout(weights(tensors, "cond.state_dict."), buffers), directory / "maskdm.pt")
        return directory / "maskdm.pt"
    if family == "diffusers":  # diffusers recomputes the fixed sin-cos table the fixture randomised
        dit = load_pretrained(import_family("dit", directory / "dit", vae))
        with torch.no_grad():
            dit.pos_embed.copy_(sincos_pos_embed_2d(dit.config.hidden_size, dit.config.grid_size)[None])
        save_pretrained(dit, directory / "dit-sincos")
        shutil.copy(directory / "dit" / "export" / "diffusion.json", directory / "dit-sincos")
        result = CliRunner().invoke(app, ["export", str(directory / "dit-sincos"), str(directory / "pipeline"),
                                          "--vae", str(vae)])
        assert result.exit_code == 0, result.output
        return directory / "pipeline"
    fmt = "train" if family == "dit" else "raw"
    return write_source(fmt, official_state_dict(load_fixture(family)[0]), directory)


def import_family(family: str, directory: Path, vae: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model, sets, _ = FAMILIES[family]
    result = mdt_import(source_of(family, directory, vae), directory / "export", model, sets)
    assert result.exit_code == 0, result.output
    return directory / "export"


def expected_diffusion(family: str) -> dict:
    if family == "maskdit":  # the official values, as the fixture recorded them from EDMPrecond/EDMLoss/edm_sampler
        meta = load_fixture("maskdit_loss_sampler")[1]
        settings = meta["sampler"]["settings"]
        return {"formulation": "edm", "sigma_data": meta["sigma_data"], "p_mean": meta["loss"]["P_mean"],
                "p_std": meta["loss"]["P_std"], "sigma_min": settings["sigma_min"],
                "sigma_max": settings["sigma_max"], "rho": settings["rho"], "learn_sigma": False}
    if family == "maskdm":  # cosine, read from the checkpoint's betas
        return {**DIT_DDPM, "beta_schedule": "cosine", "learn_sigma": False}
    return DIT_DDPM


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_import_records_its_formulation_and_samples_through_the_cli(
        family: str, tmp_path: Path, tiny_vae_dir: Path) -> None:
    export = import_family(family, tmp_path, tiny_vae_dir)
    recorded = json.loads((export / "diffusion.json").read_text())
    assert recorded == pytest.approx(expected_diffusion(family))
    sampler = FAMILIES[family][2]
    vae = "pixel" if family == "maskdm" else str(tiny_vae_dir)
    out = tmp_path / "samples"
    result = CliRunner().invoke(app, ["sample", "--ckpt", str(export), "--vae", vae, "--out", str(out),
                                      "--sampler", sampler, "--steps", "3", "--num-samples", "2", "--batch-size", "2",
                                      "--cfg-scale", "1.5", "--classes", "1,4"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "sample_config.json").read_text())
    assert record["sampler"] == sampler
    assert record["diffusion"]["formulation"] == recorded["formulation"]
    for name in ("000000.png", "000001.png"):  # NaN latents would decode to one flat colour
        assert np.asarray(Image.open(out / name)).std() > 0


@pytest.fixture(scope="module")
def maskdit_export(tmp_path_factory, tiny_vae_dir: Path) -> Path:
    return import_family("maskdit", tmp_path_factory.mktemp("maskdit"), tiny_vae_dir)


@pytest.mark.parametrize("run", ["unguided", "guided"])
def test_imported_maskdit_samples_as_the_official_edm_sampler(maskdit_export: Path, run: str) -> None:
    """The sigmas `mdt sample --steps 6` visits on the import's diffusion.json, its edm-heun sampler and its
    guidance wrapper reproduce the official edm_sampler from the same latents (num_steps=6, cfg 1.5)."""
    e, _ = load_fixture("maskdit_loss_sampler")
    checkpoint = read_checkpoint(maskdit_export)
    sigmas = _validate(SampleConfig(ckpt=maskdit_export, out=Path("unused"), num_samples=2, sampler="edm-heun",
                                    steps=6), checkpoint)
    torch.testing.assert_close(torch.tensor(sigmas, dtype=torch.float64), e["sampler.t_steps"], rtol=1e-12, atol=0)
    guidance = GuidanceConfig(scale=1.5 if run == "guided" else 1.0)
    denoiser = ClassifierFreeGuidance(load_pretrained(maskdit_export), guidance, null_class=checkpoint.num_classes,
                                      num_timesteps=1, latent_channels=checkpoint.latent_shape[0])
    one_hot = e["sampler.labels"]
    labels = torch.where(one_hot.sum(1) > 0, one_hot.argmax(1), NULL_LABEL)
    out = SAMPLERS["edm-heun"](denoiser, e["sampler.latents"], labels, diffusion=checkpoint.diffusion,
                               timesteps=sigmas, step_noise=torch.zeros_like, churn=Churn())
    assert_trajectory_close(out.double(), e[f"sampler.{run}.out"], 1e-5)


def test_imported_maskdit_samples_with_edm_heun_by_the_cli_and_refuses_ddpm(
        maskdit_export: Path, tiny_vae_dir: Path, tmp_path: Path) -> None:
    e, _ = load_fixture("maskdit_loss_sampler")
    base = ["sample", "--ckpt", str(maskdit_export), "--vae", str(tiny_vae_dir), "--num-samples", "2",
            "--batch-size", "2"]
    result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "heun"), "--sampler", "edm-heun", "--steps", "6",
                                      "--cfg-scale", "1.5"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "heun" / "sample_config.json").read_text())
    assert record["sampler"] == "edm-heun"
    assert record["steps"] == 6
    assert record["diffusion"]["sigma_data"] == 0.5
    torch.testing.assert_close(torch.tensor(record["timesteps"], dtype=torch.float64), e["sampler.t_steps"])
    assert DEFAULT_STEPS["edm-heun"] == 40  # MaskDiT's train.py/sample.py --num_steps default
    result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "ddpm")])  # the default sampler is DDPM's
    assert "edm-heun" in cli_refusal(result)
    assert not (tmp_path / "ddpm").exists()
