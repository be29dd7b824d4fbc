"""The autoencoder loader: every way of naming a VAE, the pixel identity, and offline failures."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from mdt import vae as vae_module
from mdt.errors import UserError
from mdt.vae import load_autoencoder


def test_local_folder_gives_frozen_fp32_autoencoder_with_config_facts(tiny_vae_dir: Path) -> None:
    ae = load_autoencoder(str(tiny_vae_dir), device="cpu")
    assert ae.kind == "autoencoder-kl"
    assert ae.spec == str(tiny_vae_dir.resolve())
    assert ae.scaling_factor == pytest.approx(0.18215)
    assert (ae.latent_channels, ae.downsample) == (4, 8)
    assert ae.latent_shape(64) == (4, 8, 8)
    assert ae.dtype == torch.float32
    assert not ae.module.training
    assert not any(p.requires_grad for p in ae.module.parameters())


def test_encode_moments_and_decode_use_the_scaling_factor(tiny_vae_dir: Path) -> None:
    ae = load_autoencoder(str(tiny_vae_dir), device="cpu")
    reference = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    mean, std = ae.encode_moments(pixels)
    with torch.no_grad():
        posterior = reference.encode(pixels).latent_dist
        expected_pixels = reference.decode(posterior.mean).sample.clamp(-1, 1)
    torch.testing.assert_close(mean, posterior.mean)
    torch.testing.assert_close(std, posterior.std)
    # decode takes SCALED latents, as the diffusion model produces them.
    torch.testing.assert_close(ae.decode(mean * ae.scaling_factor), expected_pixels)
    torch.testing.assert_close(ae.scale(mean), mean * ae.scaling_factor)


def test_single_safetensors_file_with_config_beside_or_named(tiny_vae_dir: Path, tmp_path: Path) -> None:
    beside = load_autoencoder(str(tiny_vae_dir / "diffusion_pytorch_model.safetensors"), device="cpu")
    lonely = tmp_path / "weights" / "vae.safetensors"
    lonely.parent.mkdir()
    shutil.copy(tiny_vae_dir / "diffusion_pytorch_model.safetensors", lonely)
    with pytest.raises(UserError, match="--vae-config"):
        load_autoencoder(str(lonely), device="cpu")
    named = load_autoencoder(str(lonely), device="cpu", config=tiny_vae_dir)
    assert named.config_dir == str(tiny_vae_dir.resolve())
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(beside.encode_moments(pixels)[0], named.encode_moments(pixels)[0])


def test_pixel_is_the_identity_with_zero_std() -> None:
    ae = load_autoencoder("pixel", device="cpu")
    assert (ae.kind, ae.scaling_factor, ae.latent_channels, ae.downsample) == ("pixel", 1.0, 3, 1)
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, std = ae.encode_moments(pixels)
    assert torch.equal(mean, pixels) and torch.count_nonzero(std) == 0
    assert torch.equal(ae.decode(pixels), pixels)


def test_offline_hub_id_fails_at_once_naming_the_id_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at call time; nothing is contacted
    with pytest.raises(UserError) as err:
        load_autoencoder("some-org/some-vae-that-is-not-cached", device="cpu")
    message = str(err.value)
    assert "some-org/some-vae-that-is-not-cached" in message and "--vae DIR" in message


def test_hub_probe_failure_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vae_module, "_hub_reachable", lambda timeout_s=3.0: False)
    with pytest.raises(UserError, match="cannot be reached"):
        load_autoencoder("stabilityai/sd-vae-ft-ema", device="cpu")


@pytest.mark.parametrize("spec", ["./no/such/vae", "/no/such/vae", "missing.safetensors"])
def test_missing_local_paths_are_user_errors(spec: str) -> None:
    with pytest.raises(UserError, match="--vae"):
        load_autoencoder(spec, device="cpu")


def test_folder_without_config_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="config.json"):
        load_autoencoder(str(tmp_path), device="cpu")
