"""`mdt sample` end to end: tiny checkpoint export + tiny AutoencoderKL, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import cli_refusal, run_cli, save_tiny_vae
from sample_helpers import CLASS_NAMES, SAMPLING_RUN, make_export
from typer.testing import CliRunner

from mdt.cli import app
from mdt.locking import LOCK_NAME

STEPS = ["--steps", "3"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training run folder: RUN/ema holds the export, its manifest names the tiny VAE."""
    root = tmp_path_factory.mktemp("ckpt")
    vae_dir = save_tiny_vae(root / "vae")
    make_export(root / "run" / "ema", vae_spec=str(vae_dir))
    return root / "run"


def _sample(run_dir: Path, out: Path, *extra: str, nproc: int = 1, n: int = 5):
    return run_cli("sample", "--ckpt", str(run_dir), "--out", str(out), "--num-samples", str(n),
                   "--cfg-scale", "4", *STEPS, *extra, nproc=nproc, **SAMPLING_RUN)


def _pngs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png")) if p.name != "grid.png"}


@pytest.fixture(scope="module")
def reference(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "samples"
    result = _sample(run_dir, out, "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
def test_outputs(reference: Path) -> None:
    pngs = _pngs(reference)
    assert sorted(pngs) == [f"{i:06d}.png" for i in range(5)]
    with np.load(reference / "samples.npz", allow_pickle=False) as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8
    assert images.shape == (5, 64, 64, 3)
    assert labels.shape == (5,)
    assert labels.min() >= 0
    assert labels.max() < len(CLASS_NAMES)
    assert images.std() > 1  # not a constant image
    assert (reference / "grid.png").is_file()
    config = json.loads((reference / "sample_config.json").read_text())
    assert config["sampler"] == "ddpm"
    assert config["steps"] == 3
    assert config["guidance"]["scale"] == 4.0
    assert config["spacing"] == "even"
    assert config["timesteps"] == [0, 500, 999]  # ADM: round(499.5) = 500
    assert not list(reference.glob(".*.tmp"))


@pytest.mark.slow
def test_two_processes_and_other_splits_give_identical_bytes(run_dir: Path, reference: Path, tmp_path: Path) -> None:
    two = tmp_path / "two"
    result = _sample(run_dir, two, "--batch-size", "2", nproc=2)
    assert result.returncode == 0, result.stderr
    assert _pngs(two) == _pngs(reference)
    assert (two / "samples.npz").read_bytes() == (reference / "samples.npz").read_bytes()


@pytest.mark.slow
def test_resume_skips_written_images(run_dir: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "resume"
    assert _sample(run_dir, out, "--batch-size", "2", n=2).returncode == 0
    first = (out / "000000.png").stat().st_mtime_ns
    (out / "000001.png").unlink()  # as if interrupted before it was written
    result = _sample(run_dir, out, "--batch-size", "2", n=5)
    assert result.returncode == 0, result.stderr
    assert (out / "000000.png").stat().st_mtime_ns == first
    assert _pngs(out) == _pngs(reference)


@pytest.mark.slow
def test_resume_with_other_settings_is_refused(run_dir: Path, reference: Path) -> None:
    def stamps() -> dict[str, int]:  # of the samples; the writer lock's record names each new holder
        return {p.name: p.stat().st_mtime_ns for p in reference.iterdir() if p.name != LOCK_NAME}

    before = stamps()
    result = _sample(run_dir, reference, "--batch-size", "2", "--seed", "1")
    assert result.returncode == 2
    assert "seed" in result.stderr
    assert "Traceback" not in result.stderr
    assert stamps() == before


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_other_samplers_and_guidance_flags_take_effect(run_dir: Path, tmp_path: Path, sampler: str) -> None:
    """Power-cosine guidance on 3 channels, then each flag changed alone: both change the samples
    (an ignored flag would give the same bytes), and sample_config.json records them."""
    variants = {"power-cosine-3": ("power-cosine", "3"), "constant-3": ("constant", "3"),
                "power-cosine-4": ("power-cosine", "4")}
    images = {}
    for name, (schedule, channels) in variants.items():
        out = tmp_path / name
        result = _sample(run_dir, out, "--sampler", sampler, "--cfg-schedule", schedule, "--cfg-channels", channels,
                         "--classes", "3,7", n=3)
        assert result.returncode == 0, result.stderr
        with np.load(out / "samples.npz", allow_pickle=False) as data:
            images[name] = data["arr_0"]
            assert data["arr_1"].tolist() == [3, 7, 3]
        guidance = json.loads((out / "sample_config.json").read_text())["guidance"]
        assert (guidance["schedule"], guidance["channels"]) == (schedule, int(channels))
    assert images["power-cosine-3"].shape == (3, 64, 64, 3)
    assert not np.array_equal(images["power-cosine-3"], images["constant-3"])  # --cfg-schedule
    assert not np.array_equal(images["power-cosine-3"], images["power-cosine-4"])  # --cfg-channels


@pytest.mark.slow
def test_pixel_space_checkpoint(tmp_path: Path) -> None:
    export = make_export(tmp_path / "pixel", vae_spec="pixel", latent_shape=(3, 8, 8), resolution=8, kind="pixel",
                         scaling_factor=1.0)
    images = {}
    for name, extra in (("default", []), ("unclipped", ["--no-clip-x0"])):
        out = tmp_path / name
        result = run_cli("sample", "--ckpt", str(export), "--out", str(out), "--num-samples", "2", "--sampler", "ddim",
                         *STEPS, "--classes", "balanced", *extra, **SAMPLING_RUN)
        assert result.returncode == 0, result.stderr
        # Pixel data is bounded: x0 is clipped to [-1, 1] by default, as ADM samples its pixel models.
        assert json.loads((out / "sample_config.json").read_text())["clip_x0"] is not bool(extra)
        with np.load(out / "samples.npz", allow_pickle=False) as data:
            assert data["arr_0"].shape == (2, 8, 8, 3)
            assert data["arr_1"].tolist() == [0, 1]
            images[name] = data["arr_0"]
    assert not np.array_equal(images["default"], images["unclipped"])


@pytest.mark.slow
def test_maskdm_ddim_on_a_pixel_checkpoint(tmp_path: Path) -> None:
    """MaskDM's DDIM: its grid and eta 1 by default, recorded; --eta takes effect (eta 0 is another image)."""
    export = make_export(tmp_path / "pixel", vae_spec="pixel", latent_shape=(3, 8, 8), resolution=8, kind="pixel",
                         scaling_factor=1.0)
    images = {}
    for name, extra in (("default", []), ("eta0", ["--eta", "0"])):
        out = tmp_path / name
        result = run_cli("sample", "--ckpt", str(export), "--out", str(out), "--num-samples", "2", "--sampler",
                         "maskdm-ddim", "--steps", "4", *extra, **SAMPLING_RUN)
        assert result.returncode == 0, result.stderr
        record = json.loads((out / "sample_config.json").read_text())
        assert (record["spacing"], record["timesteps"]) == ("linspace", [249, 499, 749, 999])
        assert record["eta"] == (0.0 if extra else 1.0)
        with np.load(out / "samples.npz", allow_pickle=False) as data:
            images[name] = data["arr_0"]
    assert not np.array_equal(images["default"], images["eta0"])


@pytest.mark.parametrize(("args", "words"), [
    (["--sampler", "maskdm-ddim"], "pixel range"),
    (["--eta", "0.5"], "--eta"),
    (["--sampler", "ddim", "--eta", "1.5"], "--eta"),
    (["--spacing", "cubic"], "--spacing"),
    (["--classes", "3,12"], "--classes"),
    (["--sampler", "euler"], "--sampler"),
    (["--cfg-channels", "5"], "--cfg-channels"),
    (["--cfg-schedule", "linear"], "--cfg-schedule"),
    (["--vae", "pixel"], "--vae pixel"),
    (["--clip-x0"], "unbounded"),
    (["--sampler", "dpm++", "--clip-x0"], "--clip-x0 belongs"),
])
def test_user_mistakes(run_dir: Path, tmp_path: Path, args: list[str], words: str) -> None:
    """In process (the exit status 2 path is covered by test_not_a_checkpoint)."""
    out = tmp_path / "bad"
    result = CliRunner().invoke(app, ["sample", "--ckpt", str(run_dir), "--out", str(out), *STEPS, *args])
    assert words in cli_refusal(result)
    assert not out.exists()


@pytest.mark.slow
def test_not_a_checkpoint(tmp_path: Path) -> None:
    result = run_cli("sample", "--ckpt", str(tmp_path), "--out", str(tmp_path / "o"), "--num-samples", "1",
                     **SAMPLING_RUN)
    assert result.returncode == 2
    assert "--ckpt" in result.stderr
    assert "ema" in result.stderr
    assert not (tmp_path / "o").exists()
