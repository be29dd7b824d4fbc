"""`mdt encode`, `mdt data verify` and `mdt data info` end to end on images the tests write."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import BAD_FILES, GOOD_IMAGES, encoded_bytes, random_image, read_samples, run_cli, run_python

from mdt.data.classes import imagenet_synsets
from mdt.data.encode import EncodeConfig, encode_dataset
from mdt.data.encode_plan import plan_shards, shards_of_rank
from mdt.data.images import preprocess
from mdt.data.manifest import read_manifest
from mdt.data.shard_format import iter_tar_samples
from mdt.data.sources import list_inputs
from mdt.errors import UserError
from mdt.locking import LOCK_NAME
from mdt.vae import load_autoencoder


def encode(input_dir: Path, out: Path, vae: str, **options) -> None:
    settings = dict(resolution=64, shard_size=3, batch_size=4, workers=0, progress=False)
    settings.update(options)
    encode_dataset(EncodeConfig(input=str(input_dir), out=str(out), vae=vae, **settings))


def test_plan_is_deterministic_and_split_by_rank() -> None:
    plan = plan_shards(10, 3)
    assert [(s.start, s.stop) for s in plan] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert [s.index for s in shards_of_rank(plan, 1, 3)] == [1]
    assert sorted(s.index for r in range(3) for s in shards_of_rank(plan, r, 3)) == [0, 1, 2, 3]


def test_counts_labels_shapes_and_rejects(encoded_flip: Path) -> None:
    manifest = read_manifest(encoded_flip)
    assert manifest.total == len(GOOD_IMAGES)
    assert manifest.rejected == len(BAD_FILES)
    assert [s.count for s in manifest.shards]
    assert sum(s.count for s in manifest.shards) == manifest.total
    assert len(manifest.shards) == -(-(len(GOOD_IMAGES) + len(BAD_FILES)) // 3)
    assert manifest.classes == ("cat", "dog", "eel")
    assert manifest.latent_shape == (4, 8, 8)
    assert manifest.flip
    assert manifest.sample_shape == (2, 2, 4, 8, 8)
    raw = json.loads((encoded_flip / "manifest.json").read_text())
    for key in ("format", "format_version", "resolution", "latent_shape", "dtype", "vae", "flip", "classes"):
        assert key in raw
    assert raw["vae"]["kind"] == "autoencoder-kl"
    assert raw["num_classes"] == 3
    assert raw["dtype"] == "float16"

    samples = read_samples(encoded_flip)
    assert len({s["key"] for s in samples}) == len(samples) == manifest.total
    expected = {f"{c}/{name}": (size, mode) for c, name, size, mode, _ in GOOD_IMAGES}
    for sample in samples:
        source = sample["source"]
        assert sample["moments"].shape == (2, 2, 4, 8, 8)
        assert sample["moments"].dtype == np.float16
        assert sample["label"] == manifest.classes.index(source["class"]) == source["label"]
        size, mode = expected.pop(source["source"])
        assert (source["width"], source["height"], source["mode"]) == (*size, mode)
        assert (sample["moments"][:, 1] > 0).all()  # std
    assert not expected

    rejects = [json.loads(line) for line in (encoded_flip / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["source"] for r in rejects) == sorted(BAD_FILES)
    assert all(r["reason"] and r["shard"].endswith(".tar") for r in rejects)


def test_flip_view_is_the_encoding_of_the_mirrored_crop(
    encoded_flip: Path, session_image_tree: Path, tiny_vae_dir: Path
) -> None:
    ae = load_autoencoder(str(tiny_vae_dir), device="cpu")
    sample = read_samples(encoded_flip)[0]
    crop = preprocess((session_image_tree / sample["source"]["source"]).read_bytes(), 64).pixels
    x = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 127.5 - 1
    for view, pixels in enumerate((x, x.flip(-1))):
        mean, std = ae.encode_moments(pixels)
        stored = torch.from_numpy(sample["moments"][view].astype(np.float32))
        torch.testing.assert_close(stored[0], mean[0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(stored[1], std[0], atol=2e-3, rtol=2e-3)


def test_imagenet_subset_keeps_standard_indices(
    imagenet_sample: Path, tiny_vae_dir: Path, tmp_path: Path
) -> None:
    picked = sorted(p.name for p in (imagenet_sample / "train").iterdir())[::200]  # 4 classes across the list
    for synset in picked:
        shutil.copytree(imagenet_sample / "train" / synset, tmp_path / "in" / synset)
    encode(tmp_path / "in", tmp_path / "out", str(tiny_vae_dir), shard_size=2)
    manifest = read_manifest(tmp_path / "out")
    assert manifest.classes == imagenet_synsets()
    assert manifest.num_classes == 1000
    standard = [line.split()[0] for line in (imagenet_sample / "synset_mapping.txt").read_text().splitlines()]
    labels = {s["source"]["class"]: s["label"] for s in read_samples(tmp_path / "out")}
    assert labels == {synset: standard.index(synset) for synset in picked}


def test_pixel_stores_the_crop_itself(image_tree: Path, tmp_path: Path) -> None:
    encode(image_tree, tmp_path / "out", "pixel", resolution=32, shard_size=20)
    manifest = read_manifest(tmp_path / "out")
    assert (manifest.vae_kind, manifest.scaling_factor, manifest.moments) == ("pixel", 1.0, ("mean",))
    sample = read_samples(tmp_path / "out")[0]
    crop = preprocess((image_tree / sample["source"]["source"]).read_bytes(), 32).pixels
    expected = crop.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1
    assert sample["moments"].shape == (1, 1, 3, 32, 32)
    np.testing.assert_allclose(sample["moments"][0, 0].astype(np.float32), expected, atol=1e-3)


def test_class_list_and_workers(image_tree: Path, tiny_vae_dir: Path, tmp_path: Path) -> None:
    listing = tmp_path / "classes.txt"
    listing.write_text("eel\ndog\ncat\nyak\n")
    encode(image_tree, tmp_path / "out", str(tiny_vae_dir), class_list=str(listing), workers=2)
    manifest = read_manifest(tmp_path / "out")
    assert manifest.classes == ("eel", "dog", "cat", "yak")
    assert {s["source"]["class"]: s["label"] for s in read_samples(tmp_path / "out")} == {
        "eel": 0,
        "dog": 1,
        "cat": 2,
    }


def test_rerun_skips_complete_shards(image_tree: Path, tiny_vae_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    encode(image_tree, out, str(tiny_vae_dir))
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = encode_dataset(
        EncodeConfig(
            str(image_tree), str(out), 64, str(tiny_vae_dir), shard_size=3, workers=0, progress=False
        )
    )
    assert again.encoded_now == 0
    assert again.total == len(GOOD_IMAGES)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before


@pytest.mark.slow
def test_mismatched_rerun_is_refused_and_changes_nothing(
    image_tree: Path, tiny_vae_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    encode(image_tree, out, str(tiny_vae_dir))
    def stamps() -> dict[str, int]:  # of the data; the writer lock's own record names each new holder
        return {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != LOCK_NAME}

    before = stamps()
    result = run_cli("encode", str(image_tree), str(out), "--vae", str(tiny_vae_dir), "--resolution", "32",
                     "--shard-size", "3", "--flip", "--workers", "0", "--no-progress")  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "resolution was 64, now 32" in result.stderr
    assert "flip was False, now True" in result.stderr
    assert "Traceback" not in result.stderr
    assert stamps() == before
    (image_tree / "cat" / "a.jpg").unlink()
    with pytest.raises(UserError, match="input_count was 14, now 13"):
        encode(image_tree, out, str(tiny_vae_dir))


def test_input_and_output_mistakes_are_one_line_errors(tmp_path: Path, tiny_vae_dir: Path) -> None:
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("precious")
    (tmp_path / "ok" / "cat").mkdir(parents=True)
    (tmp_path / "ok" / "cat" / "a.png").write_bytes(
        encoded_bytes(random_image(np.random.default_rng(0), (8, 8), "RGB"), "PNG")
    )
    cases = [
        (str(tmp_path / "missing"), str(tmp_path / "o1"), "no such folder"),
        (str(tmp_path / "empty"), str(tmp_path / "o2"), "hold no images"),
        (str(tmp_path / "ok"), str(tmp_path / "busy"), "not empty"),
        (str(tmp_path / "ok"), str(tmp_path / "busy" / "thesis.tex"), "is a file"),
    ]
    for source, out, message in cases:
        with pytest.raises(UserError, match=message):
            encode(Path(source), Path(out), str(tiny_vae_dir))
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["thesis.tex"]
    assert not (tmp_path / "o1").exists()
    assert not (tmp_path / "o2").exists()
    with pytest.raises(UserError, match="--resolution 60"):
        encode(tmp_path / "ok", tmp_path / "o3", str(tiny_vae_dir), resolution=60)


KILL_SCRIPT = """
import os, signal, sys
from mdt.data import shard_format
from mdt.data.encode import EncodeConfig, encode_dataset

write = shard_format.TarShardWriter.write
written = 0

def write_then_die(self, *args, **kwargs):
    global written
    write(self, *args, **kwargs)
    written += 1
    if written == int(sys.argv[4]):
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: a preempted node

shard_format.TarShardWriter.write = write_then_die
encode_dataset(EncodeConfig(sys.argv[1], sys.argv[2], resolution=64, vae=sys.argv[3], shard_size=3,
                            batch_size=2, workers=0, progress=False))
"""


@pytest.mark.slow
def test_resume_after_kill_matches_an_uninterrupted_run(
    session_image_tree: Path, tiny_vae_dir: Path, encoded_flip: Path, tmp_path: Path
) -> None:
    out, script = tmp_path / "out", tmp_path / "kill.py"
    script.write_text(textwrap.dedent(KILL_SCRIPT))
    # Kill mid-way through the third shard: 2 complete shards hold 5 good images, the 7th write is inside shard 3.
    killed = run_python(str(script), str(session_image_tree), str(out), str(tiny_vae_dir), "7")
    assert killed.returncode == -9, killed.stderr
    assert not (out / "manifest.json").exists()
    finals = sorted(p.name for p in out.glob("shard-*.tar"))
    assert finals == ["shard-000000.tar", "shard-000001.tar"]
    assert list(out.glob(".shard-000002.tar.*.tmp"))  # the partial shard only under a temporary name
    for name in finals:  # complete and readable
        assert sum(1 for _ in iter_tar_samples(out / name)) > 0

    encode(session_image_tree, out, str(tiny_vae_dir), batch_size=2)
    assert not list(out.glob(".*.tmp"))
    resumed, reference = read_samples(out), read_samples(encoded_flip)
    assert [(s["key"], s["label"], s["source"]) for s in resumed] == [
        (s["key"], s["label"], s["source"]) for s in reference
    ]
    for a, b in zip(resumed, reference, strict=True):  # the reference also stored the flip
        np.testing.assert_allclose(
            a["moments"][0].astype(np.float32), b["moments"][0].astype(np.float32), atol=2e-3
        )


@pytest.mark.slow
def test_verify_catches_truncated_and_missing_shards(encoded_flip: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(encoded_flip, data)
    ok = run_cli("data", "verify", str(data), "--no-progress")
    assert ok.returncode == 0
    assert f"ok, {len(GOOD_IMAGES)} samples" in ok.stdout
    shard = data / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    (data / "shard-000003.tar").unlink()
    bad = run_cli("data", "verify", str(data), "--no-progress")
    assert bad.returncode == 1
    assert "shard-000001.tar" in bad.stderr
    assert "shard-000003.tar: missing" in bad.stderr
    assert "shard-000000.tar" not in bad.stderr


@pytest.mark.slow
def test_info_summarises(encoded_flip: Path) -> None:
    result = run_cli("data", "info", str(encoded_flip))
    assert result.returncode == 0
    assert f"samples      {len(GOOD_IMAGES)} in" in result.stdout
    assert "4x8x8" in result.stdout
    missing = run_cli("data", "info", str(encoded_flip / "nope"))
    assert missing.returncode == 2
    assert "mdt encode" in missing.stderr


def write_image_tars(folder: Path) -> str:
    """Two WebDataset shards of images with `cls`, one image without a label."""
    rng = np.random.default_rng(1)
    folder.mkdir()
    for shard in range(2):
        with tarfile.open(folder / f"imgs-{shard}.tar", "w") as tar:
            for i in range(3):
                members = {
                    "jpg": encoded_bytes(random_image(rng, (80, 70), "RGB"), "JPEG"),
                    "cls": str(i).encode(),
                }
                if shard == 1 and i == 2:
                    del members["cls"]
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"s{shard}/img{i:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / "imgs-{0..1}.tar")


def test_webdataset_image_shards_as_input(tmp_path: Path, tiny_vae_dir: Path) -> None:
    pattern = write_image_tars(tmp_path / "tars")
    listing = tmp_path / "classes.txt"
    listing.write_text("apple\nbanana\ncherry\n")
    encode(Path(pattern), tmp_path / "out", str(tiny_vae_dir), class_list=str(listing))
    manifest = read_manifest(tmp_path / "out")
    assert manifest.total == 5
    assert manifest.rejected == 1
    assert manifest.classes == ("apple", "banana", "cherry")
    samples = read_samples(tmp_path / "out")
    assert sorted(s["label"] for s in samples) == [0, 0, 1, 1, 2]
    assert all(s["source"]["class"] == manifest.classes[s["label"]] for s in samples)
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert rejects == [{"source": "imgs-1.tar/s1/img002.jpg", "reason": "no cls member", "shard": None}]


@pytest.mark.slow
def test_a_flat_folder_of_images_encodes_as_one_class_for_unconditional_training(tmp_path: Path) -> None:
    faces = tmp_path / "faces"
    faces.mkdir()
    rng = np.random.default_rng(5)
    for i in range(5):
        (faces / f"face{i}.png").write_bytes(encoded_bytes(random_image(rng, (12, 12), "RGB"), "PNG"))
    (faces / "README.txt").write_text("not an image\n")
    result = run_cli("encode", str(faces), str(tmp_path / "out"), "--vae", "pixel", "--resolution", "8",
                     "--no-progress", "--workers", "0")
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(tmp_path / "out")
    assert manifest.total == 5
    assert manifest.num_classes == 1
    assert "1 non-image files ignored" in result.stdout
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class folders and no images"):
        list_inputs(str(tmp_path / "empty"))
