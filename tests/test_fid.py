"""FID/KID through clean-fid's feature pipeline, with a stand-in TorchScript feature network."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sample_helpers import run_cli, write_stand_in_inception

from mdt.errors import UserError
from mdt.eval import features
from mdt.eval.fid import FeatureOptions, evaluate, make_reference
from mdt.eval.stats import FeatureStats, fid, kid

N = 40


def _write_images(folder: Path, n: int, size: tuple[int, int], seed: int, tint: float = 0.0) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = rng.integers(0, 256, size=(size[1] // 4, size[0] // 4, 3)).astype(np.float64)
        img = np.kron(base, np.ones((4, 4, 1))) * (1 - tint) + 255 * tint
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i:06d}.png")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fid")
    samples = _write_images(root / "samples", N, (32, 32), seed=0)
    with Image.open(samples / "000000.png") as img:
        assert img.size == (32, 32)
    stack = np.stack([np.asarray(Image.open(p)) for p in sorted(samples.glob("*.png"))])
    np.savez(root / "samples.npz", arr_0=stack, arr_1=np.zeros(N, dtype=np.int64))
    return {
        "root": root,
        "samples": samples,
        "npz": root / "samples.npz",
        "other": _write_images(root / "other", N, (32, 32), seed=1, tint=0.5),
        "wide": _write_images(root / "wide", N, (48, 36), seed=0),  # center-cropped to 32 for a reference
        "net": write_stand_in_inception(root / "stand_in.pt"),
    }


def _opts(data: dict[str, Path]) -> FeatureOptions:
    return FeatureOptions(inception=data["net"], device="cpu", batch_size=16, num_workers=0, verbose=False)


def test_fid_of_a_set_with_itself_is_zero_and_npz_equals_folder(data, tmp_path: Path) -> None:
    ref = tmp_path / "ref.npz"
    stats = make_reference(data["samples"], ref, 32, opts=_opts(data))
    assert stats.feats.shape == (N, 16) and stats.meta["resolution"] == 32
    folder = evaluate(data["samples"], ref, out=tmp_path / "a.json", opts=_opts(data))
    npz = evaluate(data["npz"], ref, out=tmp_path / "b.json", opts=_opts(data))
    assert abs(folder["fid"]) < 1e-6 and abs(npz["fid"]) < 1e-6
    other = evaluate(data["other"], ref, out=tmp_path / "c.json", opts=_opts(data))
    assert other["fid"] > 1.0 and other["kid"] > folder["kid"]
    assert json.loads((tmp_path / "c.json").read_text())["fid"] == pytest.approx(other["fid"])


def test_a_folder_written_by_mdt_sample_is_read_without_its_grid(data, tmp_path: Path) -> None:
    """mdt sample writes grid.png (another size) beside {i:06d}.png: FID reads exactly the samples."""
    folder = tmp_path / "samples"
    folder.mkdir()
    for path in sorted(data["samples"].glob("*.png")):
        (folder / path.name).write_bytes(path.read_bytes())
    Image.new("RGB", (768, 220)).save(folder / "grid.png")
    Image.new("RGB", (32, 32)).save(folder / "notes.png")  # same size: would be counted silently
    ref = tmp_path / "ref.npz"
    make_reference(data["samples"], ref, 32, opts=_opts(data))
    result = evaluate(folder, ref, out=tmp_path / "m.json", opts=_opts(data))
    assert result["num_samples"] == N and result["fid"] == pytest.approx(0.0, abs=1e-3)


def test_reference_folder_is_center_cropped_and_cached(data, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = evaluate(data["samples"], data["wide"], out=tmp_path / "m.json", opts=_opts(data), cache_dir=cache)
    cached = list(cache.glob("*.npz"))
    assert len(cached) == 1
    meta = FeatureStats.load(cached[0]).meta
    assert meta["resolution"] == 32 and meta["num_images"] == N
    again = evaluate(data["samples"], data["wide"], out=tmp_path / "m.json", opts=_opts(data), cache_dir=cache)
    assert again["fid"] == first["fid"]


def test_closed_form_for_gaussian_features() -> None:
    """Diagonal covariances: FID = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2."""
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.5, 2, size=d), rng.uniform(0.5, 2, size=d)
    closed = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum())
    exact = fid(FeatureStats(mu1, np.diag(s1)), FeatureStats(mu2, np.diag(s2)))
    assert exact == pytest.approx(closed, rel=1e-9)
    # From samples of those Gaussians, the estimate converges to the closed form.
    a = FeatureStats.from_features(mu1 + rng.normal(size=(200_000, d)) * np.sqrt(s1))
    b = FeatureStats.from_features(mu2 + rng.normal(size=(200_000, d)) * np.sqrt(s2))
    assert fid(a, b) == pytest.approx(closed, rel=0.02)


def test_kid_is_zero_in_expectation_for_one_distribution() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    shifted = kid(x, y + 1.0, num_subsets=10)
    assert shifted > 0.5
    assert abs(kid(x, y, num_subsets=10)) < 0.05 * shifted
    assert kid(x, y, num_subsets=3) == kid(x, y, num_subsets=3)  # seeded subsets


def test_mixed_resolutions_and_too_few_images_are_refused(data, tmp_path: Path) -> None:
    ref = tmp_path / "ref.npz"
    make_reference(data["samples"], ref, 32, opts=_opts(data))
    mixed = _write_images(tmp_path / "mixed", 3, (32, 32), seed=3)
    Image.new("RGB", (16, 16)).save(mixed / "000003.png")
    with pytest.raises(UserError, match="mixes resolutions"):
        evaluate(mixed, ref, opts=_opts(data))
    with pytest.raises(UserError, match=f"holds {N} images but --num asks for 1000"):
        evaluate(data["samples"], ref, num=1000, opts=_opts(data))
    small = _write_images(tmp_path / "small", 4, (16, 16), seed=4)
    with pytest.raises(UserError, match="16 px"):
        evaluate(small, ref, opts=_opts(data))
    assert not (mixed / "metrics.json").exists() and not (small / "metrics.json").exists()


def test_offline_without_weights_says_where_to_put_them(data, tmp_path: Path, monkeypatch) -> None:
    missing = tmp_path / "cache" / "inception-2015-12-05.pt"
    monkeypatch.setattr(features, "clean_fid_cache_path", lambda: missing)
    opts = FeatureOptions(device="cpu", num_workers=0, verbose=False)
    with pytest.raises(UserError) as err:
        make_reference(data["samples"], tmp_path / "ref.npz", 32, opts=opts)
    message = str(err.value)
    assert str(missing) in message and features.INCEPTION_URL in message and "--inception" in message
    assert len(message.rstrip(".").split(". ")) == 1  # one sentence
    assert not (tmp_path / "ref.npz").exists() and not missing.exists()


def test_cli_fid_ref_and_fid(data, tmp_path: Path) -> None:
    ref = tmp_path / "stats.npz"
    made = run_cli("fid-ref", str(data["wide"]), "--out", str(ref), "--resolution", "32",
                   "--inception", str(data["net"]), "--workers", "0")
    assert made.returncode == 0, made.stderr
    with np.load(ref, allow_pickle=False) as stats:
        assert set(stats.files) == {"mu", "sigma", "feats", "meta"}
    out = tmp_path / "metrics.json"
    result = run_cli("fid", "--samples", str(data["npz"]), "--ref", str(ref), "--inception", str(data["net"]),
                     "--out", str(out), "--workers", "0")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(out.read_text())
    assert f"FID {metrics['fid']:.4f}" in result.stdout and metrics["num_samples"] == N
    bad = run_cli("fid", "--samples", str(tmp_path / "nope"), "--ref", str(ref))
    assert bad.returncode == 2 and "--samples" in bad.stderr and "Traceback" not in bad.stderr
