"""The autoencoder loader: every way of naming a VAE, the pixel identity, and offline failures.

MaskDiT's autoencoder_kl.pth path is checked against tests/fixtures/official/maskdit_vae.* (made by
tests/fixtures/make_maskdit_vae_fixtures.py with the official Anima-Lab/MaskDiT autoencoder.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors import safe_open

from mdt import vae as vae_module
from mdt.errors import UserError
from mdt.vae import load_autoencoder
from mdt.vae_ldm import SD_KL_F8_CONFIG

OFFICIAL = Path(__file__).parent / "fixtures" / "official"
MASKDIT_PTH = OFFICIAL / "maskdit_vae.pth"


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
    assert torch.equal(mean, pixels)
    assert torch.count_nonzero(std) == 0
    assert torch.equal(ae.decode(pixels), pixels)


def test_offline_hub_id_fails_at_once_naming_the_id_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at call time; nothing is contacted
    with pytest.raises(UserError) as err:
        load_autoencoder("some-org/some-vae-that-is-not-cached", device="cpu")
    message = str(err.value)
    assert "some-org/some-vae-that-is-not-cached" in message
    assert "--vae DIR" in message


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


def _maskdit_fixture() -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(OFFICIAL / "maskdit_vae.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["fixture"])


def _config_folder(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _close_to_scale(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("config_given", [True, False], ids=["vae-config", "config-beside"])
def test_maskdit_pth_encodes_and_decodes_as_the_official_autoencoder(tmp_path: Path, config_given: bool) -> None:
    tensors, meta = _maskdit_fixture()
    if config_given:  # as a user passes --vae-config DIR
        pth, config = MASKDIT_PTH, _config_folder(tmp_path / "cfg", meta["tiny_diffusers_config"])
    else:
        pth, config = _config_folder(tmp_path, meta["tiny_diffusers_config"]) / "autoencoder_kl.pth", None
        shutil.copy(MASKDIT_PTH, pth)
    ae = load_autoencoder(str(pth), device="cpu", config=config)
    assert (ae.kind, ae.spec, ae.config_dir) == ("autoencoder-kl", str(pth.resolve()), str(pth.parent.resolve()) if config is None else str(config.resolve()))
    assert (ae.scaling_factor, ae.latent_shape(16)) == (pytest.approx(0.18215), (4, 4, 4))
    assert not ae.module.training
    assert not any(p.requires_grad for p in ae.module.parameters())
    mean, std = ae.encode_moments(tensors["input.pixels"])
    _close_to_scale(mean, tensors["encode.mean"])
    _close_to_scale(std, tensors["encode.std"])
    # The official decode takes the SCALED latents too; mdt clamps to [-1, 1] as sample.py's uint8 cast does.
    _close_to_scale(ae.decode(tensors["input.latents"]), tensors["decode.pixels"].clamp(-1, 1))
    raw = ae.module.decode(tensors["input.latents"] / ae.scaling_factor).sample
    _close_to_scale(raw, tensors["decode.pixels"])


def test_ldm_checkpoint_nesting_and_prefix_load_the_same_weights(tmp_path: Path) -> None:
    tensors, meta = _maskdit_fixture()
    state = torch.load(MASKDIT_PTH, weights_only=True)
    nested = tmp_path / "model.ckpt"
    torch.save({"state_dict": {f"first_stage_model.{k}": v for k, v in state.items()}, "global_step": 7}, nested)
    ae = load_autoencoder(str(nested), device="cpu", config=_config_folder(tmp_path / "cfg", meta["tiny_diffusers_config"]))
    _close_to_scale(ae.encode_moments(tensors["input.pixels"])[0], tensors["encode.mean"])


def test_builtin_architecture_is_the_official_get_model_config() -> None:
    _, meta = _maskdit_fixture()
    assert meta["real_ddconfig"]["ch_mult"] == [1, 2, 4, 4]
    for key, value in meta["real_diffusers_config"].items():
        assert SD_KL_F8_CONFIG[key] == value, key


class _NotATensor:
    pass


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        (torch.zeros(3), "not a state dict"),
        ({"weights": [1, 2]}, "not a state dict"),
        ({"encoder.conv_in.weight": torch.zeros(1)}, "do not fit"),
        (_NotATensor(), "holds pickled Python objects"),
        (b"not a torch file", "not a torch file"),
        (b"junk", "not a torch file"),
    ],
    ids=["tensor", "no-tensors", "wrong-keys", "pickled-object", "garbage", "short-garbage"],
)
def test_bad_pth_is_one_sentence_naming_the_file_and_the_fix(tmp_path: Path, content: object, phrase: str) -> None:
    bad = tmp_path / "autoencoder_kl.pth"
    if isinstance(content, bytes):
        bad.write_bytes(content)
    else:
        torch.save(content, bad)
    with pytest.raises(UserError) as err:
        load_autoencoder(str(bad), device="cpu")
    message = str(err.value)
    assert str(bad) in message
    assert phrase in message
    assert "autoencoder_kl.pth or another LDM-format" in message
    assert "\n" not in message
    assert message.endswith(".")


def test_tiny_pth_without_its_config_names_vae_config(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="built-in SD kl-f8 architecture.*--vae-config DIR"):
        load_autoencoder(str(MASKDIT_PTH), device="cpu")
    with pytest.raises(UserError, match="--vae-config .*no config.json"):
        load_autoencoder(str(MASKDIT_PTH), device="cpu", config=tmp_path)


def test_other_suffixes_are_refused_naming_the_accepted_formats(tmp_path: Path) -> None:
    odd = tmp_path / "vae.bin"
    odd.write_bytes(b"x")
    with pytest.raises(UserError, match=r"\.safetensors files and LDM-format \.pth/\.pt/\.ckpt"):
        load_autoencoder(str(odd), device="cpu")
