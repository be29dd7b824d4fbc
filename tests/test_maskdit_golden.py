"""Golden tests against the official MaskDiT code (Anima-Lab/MaskDiT 73cfb96, fixtures made by
tests/fixtures/make_maskdit_fixtures.py with every tensor random): `mdt import` of its EDMPrecond state_dict
gives the official network F (with and without a mask) and D, the EDM loss terms, and the Heun
sampler's trajectories, unguided, guided and with churn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from golden_helpers import FIXTURES, assert_trajectory_close, mdt_import
from helpers import cli_refusal
from safetensors import safe_open

from mdt.diffusion.edm import EDMConfig, EDMObjective, denoise, karras_sigmas
from mdt.models import load_pretrained
from mdt.sample.guidance import ClassifierFreeGuidance, GuidanceConfig
from mdt.sample.samplers import Churn, sample_edm_heun

TOL = dict(rtol=1e-5, atol=1e-5)
NUM_CLASSES = 10


def _load(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(FIXTURES / name), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["fixture"])


def labels(one_hot: torch.Tensor) -> torch.Tensor:
    """Official one-hot rows (the zero row = null) -> mdt class indices (NUM_CLASSES = null)."""
    return torch.where(one_hot.sum(1) > 0, one_hot.argmax(1), NUM_CLASSES)


@pytest.fixture(scope="module")
def fixture(tmp_path_factory) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    tensors, _ = _load("maskdit.safetensors")
    extra, meta = _load("maskdit_loss_sampler.safetensors")
    state_dict = {k[len("state_dict."):]: v for k, v in tensors.items() if k.startswith("state_dict.")}
    directory = tmp_path_factory.mktemp("maskdit")
    # The training checkpoint dict of MaskDiT's train.py: its loaders take 'ema' (keys model.*).
    torch.save({"model": state_dict, "ema": state_dict, "opt": {}, "args": None}, directory / "ckpt.pt")
    result = mdt_import(directory / "ckpt.pt", directory / "export", "MaskDiT",
                        ["num_heads=4", "decoder_num_heads=2"])
    assert result.exit_code == 0, result.output
    return load_pretrained(directory / "export"), tensors, extra, meta


def test_network_output_is_the_official_one(fixture) -> None:
    net, t, _, _ = fixture
    y = labels(t["input.y"])
    with torch.no_grad():
        torch.testing.assert_close(net(t["input.x"], t["input.noise_labels"], y), t["output.full"], **TOL)
        masked = net(t["input.x"], t["input.noise_labels"], y, t["input.mask"].bool())
    torch.testing.assert_close(masked, t["output.masked"], **TOL)


def test_preconditioned_denoiser_is_the_official_one(fixture) -> None:
    net, t, _, _ = fixture
    with torch.no_grad():
        d = denoise(net, t["precond.x"], t["precond.sigma"], labels(t["precond.y"]))
        d_masked = denoise(net, t["precond.x"], t["precond.sigma"], labels(t["precond.y"]), t["precond.mask"].bool())
    torch.testing.assert_close(d, t["precond.out"], **TOL)
    torch.testing.assert_close(d_masked, t["precond.masked_out"], **TOL)


def test_guided_denoiser_is_the_official_forward_with_cfg(fixture) -> None:
    """Official guidance: all latent channels, null = the zero label vector, on F (so on D too)."""
    net, t, _, _ = fixture
    guided = ClassifierFreeGuidance(net, GuidanceConfig(scale=1.5), null_class=NUM_CLASSES, num_timesteps=1,
                                    latent_channels=4)
    with torch.no_grad():
        d = denoise(guided, t["precond.cfg_x"], t["precond.cfg_sigma"], labels(t["precond.cfg_y"]))
    torch.testing.assert_close(d, t["precond.cfg_out"], **TOL)


def test_edm_loss_terms_are_the_official_ones(fixture) -> None:
    net, _, e, meta = fixture
    objective = EDMObjective(EDMConfig(), num_classes=NUM_CLASSES, grid_size=4, patch_size=2, mask_ratio=0.5,
                             mae_weight=0.1)
    sigma, noise, y = e["loss.sigma"].flatten(), e["loss.noise"], labels(e["loss.labels"])
    with torch.no_grad():
        masked = objective.terms(net, e["loss.images"], y, sigma, noise, e["loss.mask"].bool())
        full = objective.terms(net, e["loss.images"], y, sigma, noise, None)
    torch.testing.assert_close(masked["denoise"], e["loss.denoise"], **TOL)
    torch.testing.assert_close(masked["mae"], 0.1 * e["loss.mae"], **TOL)
    torch.testing.assert_close(masked["denoise"] + masked["mae"], e["loss.masked"], **TOL)
    torch.testing.assert_close(full["denoise"], e["loss.full"], **TOL)
    expected_sigma = (e["loss.rnd_normal"].flatten() * 1.2 - 1.2).exp()
    torch.testing.assert_close(sigma, expected_sigma, **TOL)  # the official log-normal draw


@pytest.mark.parametrize("run", ["unguided", "guided", "churn"])
def test_heun_trajectory_is_the_official_edm_sampler(fixture, attention_kernel: float, run: str) -> None:
    net, _, e, meta = fixture
    sigmas = karras_sigmas(EDMConfig(), len(e["sampler.t_steps"]) - 1)
    torch.testing.assert_close(torch.tensor(sigmas, dtype=torch.float64), e["sampler.t_steps"], rtol=1e-12, atol=0)
    scale = 1.5 if run == "guided" else 1.0
    denoiser = ClassifierFreeGuidance(net, GuidanceConfig(scale=scale), null_class=NUM_CLASSES, num_timesteps=1,
                                      latent_channels=4)
    churn = Churn(s_churn=40.0, s_min=0.05, s_max=50.0, s_noise=1.003) if run == "churn" else Churn()
    recorded = iter(e["sampler.churn.step_noise"].double())
    step_noise = (lambda like: next(recorded)) if run == "churn" else (lambda like: torch.zeros_like(like))
    out = sample_edm_heun(denoiser, e["sampler.latents"], labels(e["sampler.labels"]), diffusion=EDMConfig(),
                          timesteps=sigmas, step_noise=step_noise, churn=churn)
    assert_trajectory_close(out.double(), e[f"sampler.{run}.out"], attention_kernel)


def test_mdt_sample_takes_an_edm_export_and_refuses_the_other_kind_of_sampler(tmp_path: Path) -> None:
    """Through the CLI: edm-heun samples an EDM export, deterministic or with churn; DDPM samplers,
    power-cosine guidance and --churn are refused where they do not apply, each with one sentence
    and nothing written."""
    from sample_helpers import make_export
    from typer.testing import CliRunner

    from mdt.cli import app

    edm = make_export(tmp_path / "edm", vae_spec="pixel", model_name="MaskDiT-T/2", latent_shape=(3, 8, 8),
                      resolution=8, kind="pixel", scaling_factor=1.0, edm=True)
    ddpm = make_export(tmp_path / "ddpm", vae_spec="pixel", latent_shape=(3, 8, 8), resolution=8, kind="pixel",
                       scaling_factor=1.0)
    base = ["--num-samples", "2", "--steps", "3", "--batch-size", "2"]
    out = tmp_path / "samples"
    for churn in ("0", "40"):
        result = CliRunner().invoke(app, ["sample", "--ckpt", str(edm), "--out", str(out / churn), *base,
                                          "--sampler", "edm-heun", "--cfg-scale", "1.5", "--churn", churn])
        assert result.exit_code == 0, result.output
        record = json.loads((out / churn / "sample_config.json").read_text())
        assert record["timesteps"][0] == pytest.approx(80.0)
        assert record["timesteps"][-1] == 0.0
        assert record["steps"] == 3
        assert len(record["timesteps"]) == 4
        assert record["churn"] == float(churn)
    assert (out / "0" / "000000.png").read_bytes() != (out / "40" / "000000.png").read_bytes()
    for ckpt, args, words in [
        (edm, ["--sampler", "ddpm"], "EDM model"),
        (edm, ["--sampler", "edm-heun", "--cfg-scale", "2", "--cfg-schedule", "power-cosine"], "constant"),
        (ddpm, ["--sampler", "edm-heun"], "DDPM model"),
        (ddpm, ["--sampler", "ddpm", "--churn", "40"], "--churn"),
    ]:
        result = CliRunner().invoke(app, ["sample", "--ckpt", str(ckpt), "--out", str(tmp_path / "bad"), *base, *args])
        assert words in cli_refusal(result)
        assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("drop", ["decoder_layer.linear.weight", "decoder_blocks.1.mlp.fc2.weight"])
def test_a_maskdit_checkpoint_of_unexpected_layout_is_refused_in_one_sentence(tmp_path: Path, drop: str) -> None:
    tensors, _ = _load("maskdit.safetensors")
    state_dict = {k[len("state_dict."):]: v for k, v in tensors.items() if k.startswith("state_dict.")}
    del state_dict[f"model.{drop}"]
    torch.save({"ema": state_dict}, tmp_path / "ckpt.pt")
    result = mdt_import(tmp_path / "ckpt.pt", tmp_path / "out", "MaskDiT", ["num_heads=4", "decoder_num_heads=2"])
    message = cli_refusal(result)
    assert "maskdit" in message.lower()
    assert "\n" not in message
    assert drop.rsplit(".", 2)[-2] in message  # names the missing tensor (decoder_layer's linear, a block's fc2)
    assert not (tmp_path / "out").exists()
