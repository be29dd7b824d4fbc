"""`make demo` in a reduced size: the same Make targets, CLI and code as the full demo, fewer steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO_ROOT
from PIL import Image


def _make_demo(demo: Path) -> subprocess.CompletedProcess:
    # Run in the environment this suite runs in (the .venv `make test` built), never a fresh install.
    venv = Path(sys.prefix)
    if not (venv / ".installed").is_file():
        pytest.skip(f"{venv} was not built by `make setup`; run the suite with `make test`")
    args = ["make", "-C", str(REPO_ROOT), "demo", f"VENV={venv}", f"DEMO={demo}", "DEMO_STEPS=20",
            "DEMO_IMAGES=100", "DEMO_SAMPLES=12"]
    return subprocess.run(args, capture_output=True, text=True, timeout=900, env={**os.environ})


def test_demo_chain_end_to_end_and_a_rerun_reuses_it(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    result = _make_demo(demo)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("grid.png", "loss.png", "metrics.json", "run/ema/model.safetensors", "samples/samples.npz",
                 "latents/manifest.json", "classifier/classifier.json"):
        assert (demo / name).is_file(), name
    metrics = json.loads((demo / "metrics.json").read_text())
    assert 0.0 <= metrics["class_accuracy"] <= 1.0 and metrics["num_samples_scored"] == 12
    assert metrics["chance_accuracy"] == 1 / 6
    assert metrics["train"]["final_step"] == 20 and "final_val_loss" in metrics["train"]
    # No Inception weights on a test machine: FID is recorded as skipped, with the reason.
    assert metrics["fid"] is None and "Inception" in metrics["fid_skipped"] or isinstance(metrics["fid"], float)
    with Image.open(demo / "grid.png") as grid:
        assert grid.size[1] > grid.size[0] / 2  # 12 samples of 6 classes: 6 rows of 2
    config = (demo / "run" / "config.yaml").read_text()
    assert "MDTv2-T/2" in config and "zero2.json" in config

    stamp = (demo / "run" / "metrics.json").stat().st_mtime_ns
    again = _make_demo(demo)
    assert again.returncode == 0, again.stderr[-3000:]
    assert " train " not in again.stdout and (demo / "run" / "metrics.json").stat().st_mtime_ns == stamp
