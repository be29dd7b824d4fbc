"""`mdt encode` under torchrun with 2 CPU processes (gloo): the shards split by rank, nothing twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import BAD_FILES, GOOD_IMAGES, REPO_ROOT
from test_encode import read_samples

from mdt.data.manifest import read_manifest


def test_two_ranks_write_disjoint_shards_and_one_manifest(
    session_image_tree: Path, tiny_vae_dir: Path, encoded_flip: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "mdt.cli", "encode", str(session_image_tree), str(out), "--vae", str(tiny_vae_dir),
        "--resolution", "64", "--shard-size", "3", "--flip", "--batch-size", "4", "--workers", "1", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("samples in") == 1  # the summary comes from rank 0 only

    manifest = read_manifest(out)
    assert manifest.total == len(GOOD_IMAGES) and manifest.rejected == len(BAD_FILES)
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
