"""FID and its companions with a stand-in TorchScript feature network (the real one: test_fid_inception.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from helpers import run_cli
from PIL import Image
from sample_helpers import SAMPLING_RUN, write_stand_in_inception

from mdt.errors import UserError
from mdt.eval import network, reference
from mdt.eval.features import FileImages, extract_features
from mdt.eval.fid import FeatureOptions, evaluate, make_reference
from mdt.eval.manifold import precision_recall
from mdt.eval.resize import build_resizer, resize_tf_bilinear
from mdt.eval.stats import FeatureStats, fid, frechet_distance, inception_score, kid

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
    stack = np.stack([np.asarray(Image.open(p)) for p in sorted(samples.glob("*.png"))])
    np.savez(root / "samples.npz", arr_0=stack, arr_1=np.zeros(N, dtype=np.int64))
    return {
        "root": root,
        "samples": samples,
        "npz": root / "samples.npz",
        "near": _write_images(root / "near", N, (32, 32), seed=1, tint=0.2),
        "far": _write_images(root / "far", N, (32, 32), seed=1, tint=0.5),
        "wide": _write_images(root / "wide", N, (48, 36), seed=0),  # center-cropped to 32 for a reference
        "net": write_stand_in_inception(root / "stand_in.pt"),
        "net2": write_stand_in_inception(root / "other_net.pt", seed=5),
        "head": write_stand_in_inception(root / "with_head.pt", head=True),
    }


def _opts(data: dict[str, Path], net: str = "net", mode: str = "clean") -> FeatureOptions:
    return FeatureOptions(inception=data[net], device="cpu", mode=mode, batch_size=16, num_workers=0, verbose=False)


def test_fid_with_itself_is_zero_shifted_sets_are_ordered_and_npz_equals_folder(data, tmp_path: Path) -> None:
    ref = tmp_path / "ref.npz"
    stats = make_reference(data["samples"], ref, 32, opts=_opts(data))
    assert stats.feats.shape == (N, 16)
    assert stats.meta["resolution"] == 32
    assert stats.meta["mode"] == "clean"
    folder = evaluate(data["samples"], ref, out=tmp_path / "a.json", opts=_opts(data))
    npz = evaluate(data["npz"], ref, out=tmp_path / "b.json", opts=_opts(data))
    assert abs(folder["fid"]) < 1e-6
    assert npz["fid"] == pytest.approx(folder["fid"], abs=1e-9)
    assert folder["precision"] == folder["recall"] == 1.0
    assert folder["mode"] == "clean"
    near = evaluate(data["near"], ref, out=tmp_path / "c.json", opts=_opts(data))
    far = evaluate(data["far"], ref, out=tmp_path / "d.json", opts=_opts(data))
    assert 0.01 < near["fid"] < far["fid"]
    assert folder["kid"] < near["kid"] < far["kid"]
    recorded = json.loads((tmp_path / "d.json").read_text())
    assert recorded["fid"] == pytest.approx(far["fid"])
    assert recorded["mode"] == "clean"
    # The stand-in has no mixed_6 and no classifier head: those metrics are null, with the reason.
    assert far["sfid"] is None
    assert "Inception-v3" in far["sfid_skipped"]
    assert far["is"] is None
    assert "classifier head" in far["is_skipped"]


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
    assert result["num_samples"] == N
    assert result["fid"] == pytest.approx(0.0, abs=1e-3)


def _features(files: list[Path], data) -> np.ndarray:
    return extract_features(FileImages(files), _opts(data).network(), "clean", batch_size=16, num_workers=0,
                            verbose=False).pool


def test_reference_folder_is_center_cropped_as_adm_does(data, tmp_path: Path) -> None:
    """48x36 -> 32: no halving (36 < 64), BICUBIC to 43x32 (round(48 * 32 / 36) = 43), crop x from (43-32)//2 = 5."""
    stats = make_reference(data["wide"], tmp_path / "ref.npz", 32, opts=_opts(data))
    cropped, squashed = tmp_path / "cropped", tmp_path / "squashed"
    cropped.mkdir(), squashed.mkdir()
    for path in sorted(data["wide"].glob("*.png")):
        with Image.open(path) as img:
            img.resize((43, 32), Image.BICUBIC).crop((5, 0, 37, 32)).save(cropped / path.name)
            img.resize((32, 32), Image.BICUBIC).save(squashed / path.name)  # a wrong "crop": aspect not kept
    by_hand = _features(sorted(cropped.glob("*.png")), data)
    np.testing.assert_allclose(stats.feats, by_hand, atol=1e-6)
    assert np.abs(stats.feats - _features(sorted(squashed.glob("*.png")), data)).max() > 1e-3


def test_reference_cache_is_read_and_keyed_by_inputs_and_code(data, tmp_path: Path, monkeypatch) -> None:
    cache, wide = tmp_path / "cache", tmp_path / "wide"
    wide.mkdir()
    for path in sorted(data["wide"].glob("*.png")):
        (wide / path.name).write_bytes(path.read_bytes())
    first = evaluate(data["samples"], wide, out=tmp_path / "m.json", opts=_opts(data), cache_dir=cache)
    (entry,) = cache.glob("*.npz")
    # Shift the cached statistics: a run that reads the cache must see the shift.
    stats = FeatureStats.load(entry)
    stats.mu = stats.mu + 1.0
    stats.save(entry)
    shifted = evaluate(data["samples"], wide, out=tmp_path / "m.json", opts=_opts(data), cache_dir=cache)
    assert shifted["fid"] == pytest.approx(first["fid"] + stats.mu.shape[0], rel=0.05)
    # Another code version, or a changed reference image, is another key: recomputed, not the stale entry.
    monkeypatch.setattr(reference, "STATS_VERSION", reference.STATS_VERSION + 100)
    recomputed = evaluate(data["samples"], wide, out=tmp_path / "m.json", opts=_opts(data), cache_dir=cache)
    assert recomputed["fid"] == pytest.approx(first["fid"], abs=1e-9)
    assert len(list(cache.glob("*.npz"))) == 2
    Image.new("RGB", (48, 36), (9, 9, 9)).save(wide / "000000.png")
    changed = evaluate(data["samples"], wide, out=tmp_path / "m.json", opts=_opts(data), cache_dir=cache)
    assert changed["fid"] != pytest.approx(first["fid"])
    assert len(list(cache.glob("*.npz"))) == 3


def test_frechet_distance_closed_form_and_near_singular_covariances() -> None:
    """Commuting covariances Q diag(s) Q^T: FID = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2."""
    rng = np.random.default_rng(0)
    d = 64
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.5, 2, size=d), rng.uniform(0.5, 2, size=d)
    closed = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum())
    exact = frechet_distance(mu1, q @ np.diag(s1) @ q.T, mu2, q @ np.diag(s2) @ q.T)
    assert exact == pytest.approx(closed, rel=1e-9)
    # Random full-rank covariances: scipy's sqrtm (clean-fid's and ADM's way) agrees.
    a, b = rng.normal(size=(d, 3 * d)), rng.normal(size=(d, 3 * d))
    sa, sb = a @ a.T / d, b @ b.T / d
    via_sqrtm = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(sa) + np.trace(sb)
                      - 2 * np.trace(scipy.linalg.sqrtm(sa @ sb).real))
    assert frechet_distance(mu1, sa, mu2, sb) == pytest.approx(via_sqrtm, rel=1e-9)
    # Rank 5 of 64 (as 6 samples of 64-d features) plus round-off: finite, real, and the closed form.
    s1[5:], s2[5:] = 1e-13, 0.0
    near = frechet_distance(mu1, q @ np.diag(s1) @ q.T, mu2, q @ np.diag(s2) @ q.T)
    closed = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum())
    assert np.isfinite(near)
    assert near == pytest.approx(closed, rel=1e-6)
    feats = rng.normal(size=(6, d))
    same = FeatureStats.from_features(feats)
    assert abs(fid(same, same)) < 1e-6 * np.trace(same.sigma)  # sqrt of round-off-sized eigenvalues
    with pytest.raises(UserError, match="NaN"):
        frechet_distance(mu1 * np.nan, sa, mu2, sb)


def test_kid_equals_the_unbiased_mmd_written_out() -> None:
    """With subsets as large as the sets, every subset is the whole set: KID is the unbiased MMD^2 of
    k(x, y) = (x.y / d + 1)^3, here summed term by term."""
    rng = np.random.default_rng(0)
    m, d = 7, 3
    x, y = rng.normal(size=(m, d)), rng.normal(size=(m, d)) + 0.5

    def k(u, v) -> float:
        return (sum(ui * vi for ui, vi in zip(u, v, strict=True)) / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    assert kid(x, y, num_subsets=4) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_precision_recall_extremes_on_constructed_sets() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(60, 8))
    b = rng.normal(size=(60, 8)) + 100.0  # far from a
    assert precision_recall(a, a) == (1.0, 1.0)
    assert precision_recall(a, b) == (0.0, 0.0)
    # Samples = one of the reference's two clusters: all inside the reference, half of it covered.
    assert precision_recall(np.concatenate([a, b]), a) == (1.0, 0.5)
    # The reverse: the reference is covered, half of the samples are outside it.
    assert precision_recall(a, np.concatenate([a, b])) == (0.5, 1.0)


def test_inception_score_extremes_and_adm_formula() -> None:
    k = 10
    assert inception_score(np.zeros((50, k))) == pytest.approx(1.0)  # one uniform prediction for all
    confident = np.eye(k)[np.arange(50) % k] * 60.0  # each class equally often, each image sure of it
    assert inception_score(confident) == pytest.approx(k, rel=1e-6)
    logits = np.random.default_rng(0).normal(size=(30, k)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)  # ADM: kl = p (log p - log mean p), per split
    adm = np.mean([np.exp(np.mean(np.sum(s * (np.log(s) - np.log(s.mean(0, keepdims=True))), 1)))
                   for s in (p[:20], p[20:])])
    assert inception_score(logits, split_size=20) == pytest.approx(adm, rel=1e-9)


def test_is_reported_when_the_network_has_a_classifier_head(data, tmp_path: Path) -> None:
    ref = tmp_path / "ref.npz"
    make_reference(data["samples"], ref, 32, opts=_opts(data, "head"))
    result = evaluate(data["near"], ref, out=tmp_path / "m.json", opts=_opts(data, "head"))
    assert result["is"] is not None
    assert 1.0 < result["is"] <= 10.0
    assert result["is_skipped"] is None


def test_bad_inputs_are_one_sentence_each(data, tmp_path: Path) -> None:
    ref = tmp_path / "ref.npz"
    make_reference(data["samples"], ref, 32, opts=_opts(data))
    mixed = _write_images(tmp_path / "mixed", 3, (32, 32), seed=3)
    Image.new("RGB", (16, 16)).save(mixed / "000003.png")
    bare = tmp_path / "bare.npz"
    np.savez(bare, mu=np.zeros(16), sigma=np.eye(16))
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(data["npz"].read_bytes()[:5000])
    broken = _write_images(tmp_path / "broken", 4, (32, 32), seed=5)
    (broken / "000002.png").write_bytes((broken / "000002.png").read_bytes()[:100])  # header intact, data cut
    cases = [
        (dict(samples=broken), "000002.png cannot be read as an image"),
        (dict(samples=mixed), "mixes resolutions"),
        (dict(num=1000), f"holds {N} images but --num asks for 1000"),
        (dict(samples=_write_images(tmp_path / "small", 4, (16, 16), seed=4)), "16 px"),
        (dict(opts=_opts(data, mode="adm")), "was computed in clean mode but --mode is adm"),
        (dict(opts=_opts(data, "net2")), "another feature network"),
        (dict(ref=bare), "--trust-ref"),
        (dict(samples=corrupt), "not a readable npz"),
        (dict(ref=corrupt), "not a readable npz"),
    ]
    for kwargs, words in cases:
        args = {"samples": data["samples"], "ref": ref, "opts": _opts(data), **kwargs}
        with pytest.raises(UserError, match=words) as err:
            evaluate(args.pop("samples"), args.pop("ref"), out=tmp_path / "never.json", **args)
        assert len(str(err.value).rstrip(".").split(". ")) == 1, err.value
    assert not (tmp_path / "never.json").exists()
    trusted = evaluate(data["samples"], bare, out=tmp_path / "t.json", opts=_opts(data), trust_ref=True)
    assert trusted["reference_checked"] is False
    assert trusted["kid"] is None
    assert trusted["precision"] is None


def test_offline_without_weights_says_what_to_do(data, tmp_path: Path, monkeypatch) -> None:
    missing = tmp_path / "cache" / "inception-2015-12-05.pt"
    monkeypatch.setattr(network, "clean_fid_cache_path", lambda: missing)
    monkeypatch.setattr(network, "installed_inception_path", lambda: None)
    opts = FeatureOptions(device="cpu", num_workers=0, verbose=False)
    with pytest.raises(UserError) as err:
        make_reference(data["samples"], tmp_path / "ref.npz", 32, opts=opts)
    message = str(err.value)
    assert str(missing) in message
    assert "make setup" in message
    assert "--inception" in message
    assert len(message.rstrip(".").split(". ")) == 1  # one sentence
    assert not (tmp_path / "ref.npz").exists()
    assert not missing.exists()


@pytest.mark.slow
def test_cli_fid_ref_and_fid(data, tmp_path: Path) -> None:
    ref = tmp_path / "stats.npz"
    made = run_cli("fid-ref", str(data["wide"]), "--out", str(ref), "--resolution", "32",
                   "--inception", str(data["net"]), "--workers", "0", **SAMPLING_RUN)
    assert made.returncode == 0, made.stderr
    with np.load(ref, allow_pickle=False) as stats:
        assert set(stats.files) == {"mu", "sigma", "feats", "meta"}
    out = tmp_path / "metrics.json"
    result = run_cli("fid", "--samples", str(data["npz"]), "--ref", str(ref), "--inception", str(data["net"]),
                     "--out", str(out), "--workers", "0", **SAMPLING_RUN)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(out.read_text())
    assert f"[clean] FID {metrics['fid']:.4f}" in result.stdout
    assert metrics["num_samples"] == N
    assert metrics["feature_network_source"] == "--inception"
    bad = run_cli("fid", "--samples", str(tmp_path / "nope"), "--ref", str(ref), **SAMPLING_RUN)
    assert bad.returncode == 2
    assert "--samples" in bad.stderr
    assert "Traceback" not in bad.stderr
    # A broken image met by a loader worker process: still one sentence, not the worker's traceback.
    broken = _write_images(tmp_path / "broken", 3, (32, 32), seed=5)
    (broken / "000001.png").write_bytes((broken / "000001.png").read_bytes()[:100])
    bad = run_cli("fid", "--samples", str(broken), "--ref", str(ref), "--inception", str(data["net"]),
                  "--workers", "2", **SAMPLING_RUN)
    assert bad.returncode == 2, bad.stderr
    assert "000001.png cannot be read as an image" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr, bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: "), bad.stderr


@pytest.mark.slow
def test_two_processes_compute_the_features_of_one(data, tmp_path: Path) -> None:
    """torchrun with 2 ranks: 40 images in batches of 16 (16, 16, 8) split 2 : 1 over the ranks."""
    files = {}
    for nproc in (1, 2):
        files[nproc] = tmp_path / f"ref{nproc}.npz"
        made = run_cli("fid-ref", str(data["samples"]), "--out", str(files[nproc]), "--resolution", "32",
                       "--inception", str(data["net"]), "--workers", "0", "--batch-size", "16",
                       nproc=nproc, **SAMPLING_RUN)
        assert made.returncode == 0, made.stderr
    one, two = FeatureStats.load(files[1]), FeatureStats.load(files[2])
    assert one.feats.shape == (N, 16)
    assert np.array_equal(one.feats, two.feats)


def _tf1_resize_bilinear_by_the_kernel(image: np.ndarray, size: int) -> np.ndarray:
    """TF1's ResizeBilinear (align_corners=False, legacy: no half-pixel centers), pixel by pixel, float32:
    source y = i * (in / out); top = floor, bottom = min(ceil, in - 1); lerp along x, then along y."""
    f32 = np.float32
    h, w = image.shape[:2]
    out = np.empty((size, size, image.shape[2]), dtype=f32)
    for i in range(size):
        y = f32(i) * (f32(h) / f32(size))
        y0, y1 = int(np.floor(y)), min(int(np.ceil(y)), h - 1)
        for j in range(size):
            x = f32(j) * (f32(w) / f32(size))
            x0, x1 = int(np.floor(x)), min(int(np.ceil(x)), w - 1)
            tl, tr, bl, br = (image[a, b].astype(f32) for a, b in ((y0, x0), (y0, x1), (y1, x0), (y1, x1)))
            top = tl + (tr - tl) * f32(x - x0)
            bottom = bl + (br - bl) * f32(x - x0)
            out[i, j] = top + (bottom - top) * f32(y - y0)
    return out


def test_adm_and_clean_resizes_each_match_their_reference_and_differ() -> None:
    image = np.random.default_rng(0).integers(0, 256, size=(16, 12, 3), dtype=np.uint8)
    adm = build_resizer("adm")(image)
    assert adm.shape == (299, 299, 3)
    assert adm.dtype == np.float32
    np.testing.assert_allclose(resize_tf_bilinear(image, 37), _tf1_resize_bilinear_by_the_kernel(image, 37), atol=1e-4)
    np.testing.assert_allclose(adm[::7, ::5], _tf1_resize_bilinear_by_the_kernel(image, 299)[::7, ::5], atol=1e-4)
    # clean-fid's clean mode: each channel as a float32 PIL image, BICUBIC to 299, no rounding.
    clean = build_resizer("clean")(image)
    by_pil = np.stack([np.asarray(Image.fromarray(image[..., c].astype(np.float32), mode="F")
                                  .resize((299, 299), Image.BICUBIC)) for c in range(3)], axis=-1)
    np.testing.assert_allclose(clean, by_pil.clip(0, 255), atol=1e-4)
    assert np.abs(clean - adm).mean() > 1.0
    # The legacy kernel is not torch's (half-pixel) bilinear either.
    half_pixel = torch.nn.functional.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float(), size=(299, 299),
                                                 mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    assert np.abs(half_pixel - adm).mean() > 1.0
