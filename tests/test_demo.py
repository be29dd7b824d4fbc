"""`make demo` in a reduced size: the same Make targets, CLI and code as the full demo, fewer steps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO_ROOT, run_command
from PIL import Image

from mdt.eval.classifier import load_classifier, predict
from mdt.eval.network import FID_HELPER_SHA1

pytestmark = pytest.mark.slow  # launches processes: `make test-fast` leaves this module out


def _make_demo(demo: Path) -> subprocess.CompletedProcess:
    # Run in the environment this suite runs in (the .venv `make test` built), never a fresh install.
    venv = Path(sys.prefix)
    if not (venv / ".installed").is_file():
        pytest.skip(f"{venv} was not built by `make setup`; run the suite with `make test`")
    args = ["make", "-C", str(REPO_ROOT), "demo", f"VENV={venv}", f"DEMO={demo}", "DEMO_STEPS=20",
            "DEMO_IMAGES=100", "DEMO_SAMPLES=12",
            "DEMO_VAL=10"]
    return run_command(args, timeout=900)


def test_demo_chain_end_to_end_and_a_rerun_reuses_it(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    result = _make_demo(demo)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("compare.png", "grid.png", "loss.png", "metrics.json", "run/ema/model.safetensors", "samples/samples.npz",
                 "latents/manifest.json", "classifier/classifier.json"):
        assert (demo / name).is_file(), name
    metrics = json.loads((demo / "metrics.json").read_text())
    # The recorded class accuracy is the probe's verdict on exactly these 12 samples and their labels,
    # and the probe itself tells the real held-out images apart.
    model, _ = load_classifier(demo / "classifier")
    with np.load(demo / "samples" / "samples.npz", allow_pickle=False) as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert metrics["num_samples_scored"] == len(labels) == 12
    assert sorted(labels.tolist()) == sorted(list(range(6)) * 2)
    assert metrics["class_accuracy"] == float((predict(model, images) == labels).mean())
    assert metrics["classifier_val_accuracy"] >= 0.9
    assert metrics["chance_accuracy"] == 1 / 6
    assert metrics["train"]["final_step"] == 20
    assert "final_val_loss" in metrics["train"]
    # FID and precision/recall from the real Inception (installed by make setup) against the 60 held-out images.
    assert metrics["fid_skipped"] is None
    assert metrics["mode"] == "clean"
    assert metrics["fid"] > 0
    assert metrics["num_samples"] == 12
    assert metrics["num_reference"] == 60
    assert metrics["resolution"] == 16
    assert metrics["feature_network"] == FID_HELPER_SHA1 or metrics["feature_network_source"] == "clean-fid cache"
    assert 0.0 <= metrics["precision"] <= 1.0
    assert 0.0 <= metrics["recall"] <= 1.0
    assert metrics["sfid"] > 0
    with Image.open(demo / "grid.png") as grid:
        assert grid.size[1] > grid.size[0] / 2  # 12 samples of 6 classes: 6 rows of 2
    config = (demo / "run" / "config.yaml").read_text()
    assert "DiT-T/2" in config
    assert "zero2.json" in config

    stamp = (demo / "run" / "metrics.json").stat().st_mtime_ns
    again = _make_demo(demo)
    assert again.returncode == 0, again.stderr[-3000:]
    assert " train " not in again.stdout
    assert (demo / "run" / "metrics.json").stat().st_mtime_ns == stamp
