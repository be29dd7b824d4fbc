"""`mdt export --format diffusers` writes a folder DiTPipeline loads and runs; `mdt import` of that
folder (and of a pipeline's transformer/) gives back the same model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DiTPipeline
from helpers import cli_refusal
from sample_helpers import CLASS_NAMES, make_export
from typer.testing import CliRunner

from mdt.cli import app
from mdt.models import load_pretrained
from mdt.models.diffusers_dit import match_original_dit


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def dit_export(tmp_path_factory, tiny_vae_dir: Path) -> Path:
    return make_export(tmp_path_factory.mktemp("dit") / "export", vae_spec=str(tiny_vae_dir))


@pytest.fixture(scope="module")
def pipeline_dir(dit_export: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pipe") / "pipeline"
    result = _invoke("export", str(dit_export), str(out), "--format", "diffusers")
    assert result.exit_code == 0, result.output
    return out


def test_dit_pipeline_loads_the_export_and_matches_the_model(dit_export: Path, pipeline_dir: Path) -> None:
    pipe = DiTPipeline.from_pretrained(pipeline_dir)
    model = load_pretrained(dit_export)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    t, y = torch.tensor([0, 500, 999]), torch.tensor([1, 4, 10])  # 10: the null class
    with torch.no_grad():
        expected = model(x, t, y)
        plain = pipe.transformer(x, timestep=t, class_labels=y).sample
        exact = match_original_dit(pipe.transformer)(x, timestep=t, class_labels=y).sample
    torch.testing.assert_close(exact, expected, rtol=1e-5, atol=1e-5)
    assert (plain[1:] - expected[1:]).abs().max() > 1e-3  # diffusers' own timestep frequencies differ
    assert pipe.labels == {name: i for i, name in enumerate(CLASS_NAMES)}
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    images = pipe(class_labels=[3], num_inference_steps=2, guidance_scale=1.0, output_type="np").images
    assert images.shape == (1, 64, 64, 3)
    assert images.std() > 0


@pytest.mark.parametrize("subfolder", ["", "transformer"])
def test_import_of_a_diffusers_folder_gives_the_model_back(dit_export: Path, pipeline_dir: Path, tmp_path: Path,
                                                           subfolder: str) -> None:
    source = pipeline_dir / subfolder if subfolder else pipeline_dir
    result = _invoke("import", str(source), str(tmp_path / "back"), "--model", "DiT")
    assert result.exit_code == 0, result.output
    back, original = load_pretrained(tmp_path / "back"), load_pretrained(dit_export)
    assert back.config.num_heads == original.config.num_heads
    assert back.config.depth == original.config.depth
    for key, value in original.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert json.loads((tmp_path / "back" / "import.json").read_text())["format"] == "diffusers"


def test_export_refuses_non_dit_and_missing_vae(tmp_path: Path, tiny_vae_dir: Path) -> None:
    mdt = make_export(tmp_path / "mdt", vae_spec=str(tiny_vae_dir), model_name="MDTv2-T/2")
    result = _invoke("export", str(mdt), str(tmp_path / "out"))
    assert "DiT models only" in cli_refusal(result)
    pixel = make_export(tmp_path / "pixel", vae_spec="pixel", latent_shape=(3, 8, 8), resolution=8, kind="pixel",
                        scaling_factor=1.0)
    result = _invoke("export", str(pixel), str(tmp_path / "out"))
    assert "pixel space" in cli_refusal(result)
    assert not (tmp_path / "out").exists()
