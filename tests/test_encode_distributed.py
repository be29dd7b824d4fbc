"""`mdt encode` under torchrun with 2 CPU processes (gloo): the shards split by rank, nothing twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import BAD_FILES, GOOD_IMAGES, ONE_THREAD, read_samples, run_cli

from mdt.data.manifest import read_manifest

pytestmark = pytest.mark.slow  # launches processes: `make test-fast` leaves this module out


def test_two_ranks_write_disjoint_shards_and_one_manifest(
    session_image_tree: Path, tiny_vae_dir: Path, encoded_flip: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = run_cli(
        "encode", str(session_image_tree), str(out), "--vae", str(tiny_vae_dir), "--resolution", "64",
        "--shard-size", "3", "--flip", "--batch-size", "4", "--workers", "1", "--no-progress",
        nproc=2, env=ONE_THREAD, timeout=180, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("samples in") == 1  # the summary comes from rank 0 only

    manifest = read_manifest(out)
    assert manifest.total == len(GOOD_IMAGES)
    assert manifest.rejected == len(BAD_FILES)
    writers = {
        p.stem: json.loads(p.read_text())["rank"] for p in (out / ".encode-state").glob("shard-*.json")
    }
    assert writers == {f"shard-{i:06d}": i % 2 for i in range(len(manifest.shards))}

    samples = read_samples(out)
    keys = [s["key"] for s in samples]
    assert len(keys) == len(set(keys)) == len(GOOD_IMAGES)
    sources = sorted(s["source"]["source"] for s in samples)
    assert sources == sorted(s["source"]["source"] for s in read_samples(encoded_flip))
    assert (out / "manifest.json").read_text().count('"shard-') == len(manifest.shards)
