"""`mdt import` on bad input: one sentence naming the problem, exit status 2, nothing left behind;
any size imports (not only presets); old exports are refused; an import samples and trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from golden_helpers import load_fixture, mdt_import, official_state_dict, write_source
from helpers import cli_refusal, run_cli
from model_helpers import tiny_diffusers

from mdt.errors import UserError
from mdt.models import load_pretrained
from mdt.models.io import CONFIG, FORMAT_KEY


@pytest.fixture(scope="module")
def dit_state_dict() -> dict[str, torch.Tensor]:
    return official_state_dict(load_fixture("dit")[0])


def _refused(result, out: Path, *words: str) -> None:
    message = cli_refusal(result)
    for word in words:
        assert word in message, message
    assert "\n" not in message
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())


@pytest.mark.slow
def test_truncated_file_exits_2_and_writes_nothing(tmp_path: Path, dit_state_dict) -> None:
    source = write_source("raw", dit_state_dict, tmp_path)
    data = source.read_bytes()
    source.write_bytes(data[: len(data) // 2])
    result = run_cli("import", str(source), str(tmp_path / "out"), "--model", "DiT", "--set", "num_heads=4")
    assert result.returncode == 2, result.stderr
    assert "truncated" in result.stderr
    assert str(source) in result.stderr
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_family(tmp_path: Path, dit_state_dict) -> None:
    source = write_source("raw", dit_state_dict, tmp_path)
    _refused(mdt_import(source, tmp_path / "out", "MDTv2-XL/2", []), tmp_path / "out", "dit", "MDTv2-XL/2")


def test_preset_contradicting_the_shapes_names_both(tmp_path: Path, dit_state_dict) -> None:
    source = write_source("raw", dit_state_dict, tmp_path)
    _refused(mdt_import(source, tmp_path / "out", "DiT-XL/2", []), tmp_path / "out", "hidden_size=1152", "64")
    _refused(mdt_import(source, tmp_path / "out", "DiT", ["num_heads=4", "depth=5"]), tmp_path / "out",
             "depth=5", "depth=3")
    _refused(mdt_import(source, tmp_path / "out", "DiT", []), tmp_path / "out", "num_heads")
    _refused(mdt_import(source, tmp_path / "out", "DiT", ["num_heads=4"], "--num-classes", "1000"),
             tmp_path / "out", "1000", "10")


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_state_dict_with_missing_or_extra_keys(tmp_path: Path, dit_state_dict, change: str) -> None:
    broken = dict(dit_state_dict)
    if change == "missing":
        del broken["blocks.1.mlp.fc2.weight"]
        word = "blocks.1.mlp.fc2.weight"
    else:
        broken["blocks.0.attn.extra_scale"] = torch.ones(1)
        word = "extra_scale"
    source = write_source("raw", broken, tmp_path)
    _refused(mdt_import(source, tmp_path / "out", "DiT", ["num_heads=4"]), tmp_path / "out", word)


def test_unknown_keys_are_named(tmp_path: Path) -> None:
    source = write_source("raw", {"encoder.weight": torch.ones(2), "head.bias": torch.ones(2)}, tmp_path)
    _refused(mdt_import(source, tmp_path / "out", "DiT", []), tmp_path / "out", "encoder.weight", "head.bias")


class _Custom:  # an arbitrary class: unpickling it is what weights_only refuses
    def __init__(self) -> None:
        self.value = 3


def test_pickle_needing_full_unpickling_needs_trust(tmp_path: Path, dit_state_dict) -> None:
    source = tmp_path / "custom.pt"
    torch.save({"ema": dit_state_dict, "extra": _Custom()}, source)
    _refused(mdt_import(source, tmp_path / "out", "DiT", ["num_heads=4"]), tmp_path / "out", "--trust-pickle")
    result = mdt_import(source, tmp_path / "out", "DiT", ["num_heads=4"], "--trust-pickle")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_existing_out_is_refused(tmp_path: Path, dit_state_dict) -> None:
    source = write_source("raw", dit_state_dict, tmp_path)
    (tmp_path / "out").mkdir()
    result = mdt_import(source, tmp_path / "out", "DiT", ["num_heads=4"])
    assert "already exists" in cli_refusal(result)


@pytest.mark.slow
def test_old_export_is_refused_with_one_sentence(tmp_path: Path, dit_state_dict) -> None:
    source = write_source("raw", dit_state_dict, tmp_path)
    assert mdt_import(source, tmp_path / "out", "DiT", ["num_heads=4"]).exit_code == 0
    config_path = tmp_path / "out" / CONFIG
    config = json.loads(config_path.read_text())
    del config[FORMAT_KEY]
    config_path.write_text(json.dumps(config))
    with pytest.raises(UserError, match="earlier mdt.*retrain it"):
        load_pretrained(tmp_path / "out")
    result = run_cli("sample", "--ckpt", str(tmp_path / "out"), "--out", str(tmp_path / "s"), "--num-samples", "1",
                     "--vae", "pixel")
    assert result.returncode == 2
    assert "earlier mdt" in result.stderr


def test_import_at_a_size_no_preset_has_keeps_the_sizes(tmp_path: Path, dit_state_dict) -> None:
    """The fixture is depth 3, width 64, 4x4 grid, 10 classes: no preset has those."""
    source = write_source("raw", dit_state_dict, tmp_path)
    assert mdt_import(source, tmp_path / "out", "DiT", ["num_heads=4"]).exit_code == 0
    config = load_pretrained(tmp_path / "out").config
    assert (config.depth, config.hidden_size, config.grid_size, config.num_classes, config.num_heads) == (3, 64, 4, 10, 4)
    assert json.loads((tmp_path / "out" / "diffusion.json").read_text())["num_timesteps"] == 1000


@pytest.mark.slow
def test_an_import_samples_and_fine_tunes_through_the_cli(tmp_path: Path, tiny_vae_dir: Path) -> None:
    """The official MDTv2 fixture (4x8x8 latents, 10 classes) -> mdt sample --vae, and mdt train --init-from
    on latents of the same shape from the tiny VAE."""
    import numpy as np
    from PIL import Image

    from mdt.data.encode import EncodeConfig, encode_dataset

    tensors, _ = load_fixture("mdtv2")
    source = write_source("raw", official_state_dict(tensors), tmp_path)
    assert mdt_import(source, tmp_path / "mdtv2", "MDTv2", []).exit_code == 0
    result = run_cli("sample", "--ckpt", str(tmp_path / "mdtv2"), "--vae", str(tiny_vae_dir), "--out",
                     str(tmp_path / "samples"), "--num-samples", "2", "--steps", "3", "--cfg-scale", "3.8",
                     "--cfg-schedule", "power-cosine", "--cfg-channels", "3")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == ["000000.png", "000001.png", "grid.png"]

    rng = np.random.default_rng(0)
    for c in range(10):
        folder = tmp_path / "images" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    encode_dataset(EncodeConfig(input=str(tmp_path / "images"), out=str(tmp_path / "latents"), resolution=64,
                                vae=str(tiny_vae_dir), shard_size=10, workers=0, progress=False))
    result = run_cli("train", "--data", str(tmp_path / "latents"), "--model", "MDTv2-T/2", "--init-from",
                     str(tmp_path / "mdtv2"), "--out", str(tmp_path / "run"), "--steps", "2", "--micro-batch", "4",
                     "--num-workers", "0", "--log-every", "1", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "records no data manifest" in result.stdout + result.stderr
    tuned = load_pretrained(tmp_path / "run" / "ema")
    assert tuned.config.depth == 6
    assert tuned.config.hidden_size == 64  # the imported model, not MDTv2-T/2


def _pipeline(directory: Path, scheduler: dict | None) -> Path:
    """A DiTPipeline-like folder: transformer/ (a tiny diffusers DiT) and, if given, scheduler/."""
    tiny_diffusers().save_pretrained(directory / "transformer")
    if scheduler is not None:
        (directory / "scheduler").mkdir()
        (directory / "scheduler" / "scheduler_config.json").write_text(json.dumps(
            {"_class_name": "DDIMScheduler", "clip_sample": False, **scheduler}))
    return directory


def _cosine_betas() -> list[float]:
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="squaredcos_cap_v2").betas.tolist()  # float32, as a saved config holds


@pytest.mark.parametrize("scheduler, expected", [
    (None, {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_timesteps": 1000}),
    ({"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 500}, {"beta_schedule": "cosine",
                                                                          "num_timesteps": 500}),
    ({"beta_schedule": "linear", "beta_start": 0.00085, "beta_end": 0.012}, {"beta_start": 0.00085, "beta_end": 0.012}),
    ({"trained_betas": "cosine"}, {"beta_schedule": "cosine", "num_timesteps": 1000}),
])
def test_a_diffusers_pipeline_records_its_schedulers_ddpm(tmp_path: Path, scheduler, expected) -> None:
    if scheduler and scheduler.get("trained_betas") == "cosine":
        scheduler = {"trained_betas": _cosine_betas()}
    source = _pipeline(tmp_path / "pipe", scheduler)
    assert mdt_import(source, tmp_path / "out", "DiT", []).exit_code == 0
    diffusion = json.loads((tmp_path / "out" / "diffusion.json").read_text())
    assert diffusion["formulation"] == "ddpm"
    assert diffusion["prediction_type"] == "epsilon"
    assert {k: diffusion[k] for k in expected} == pytest.approx(expected)


@pytest.mark.parametrize("scheduler, words", [
    ({"beta_schedule": "scaled_linear"}, "'scaled_linear'"),
    ({"prediction_type": "v_prediction"}, "'v_prediction'"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ({"trained_betas": [0.01] * 1000}, "betas"),
])
def test_a_diffusers_scheduler_mdt_cannot_sample_is_refused(tmp_path: Path, scheduler, words: str) -> None:
    source = _pipeline(tmp_path / "pipe", scheduler)
    _refused(mdt_import(source, tmp_path / "out", "DiT", []), tmp_path / "out", words, "scheduler_config.json")


def test_a_maskdit_checkpoint_with_a_variance_output_is_refused(tmp_path: Path) -> None:
    """MaskDiT is EDM: its final layer predicts D (C channels); 2C would be a learned variance EDM has not."""
    state_dict = official_state_dict(load_fixture("maskdit")[0])
    for name in ("weight", "bias"):
        key = f"model.final_layer.linear.{name}"
        state_dict[key] = torch.cat([state_dict[key], state_dict[key]])
    torch.save({"ema": state_dict}, tmp_path / "ckpt.pt")
    _refused(mdt_import(tmp_path / "ckpt.pt", tmp_path / "out", "MaskDiT", ["num_heads=4", "decoder_num_heads=2"]),
             tmp_path / "out", "EDM", "variance")
