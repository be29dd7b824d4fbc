"""experiments/compare_families.py end to end at its smallest: four families, a few seconds of training each."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from helpers import ONE_THREAD, REPO_ROOT, run_cli, run_python

pytestmark = pytest.mark.slow  # launches processes: `make test-fast` leaves this module out

TOOL = REPO_ROOT / "experiments" / "compare_families.py"
FAMILIES = ["DiT", "MDTv2", "MaskDiT", "TREAD"]


def compare(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_python(str(TOOL), *args, env=ONE_THREAD, timeout=timeout)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> tuple[Path, Path]:
    """The demo's shapes, few of them: latents in 3 shards (one held out) and 12 held-out images."""
    root = tmp_path_factory.mktemp("compare-data")
    made = run_cli("shapes", str(root / "images"), "--train-per-class", "8", "--val-per-class", "2")
    assert made.returncode == 0, made.stderr[-2000:]
    encoded = run_cli("encode", str(root / "images" / "train"), str(root / "latents"), "--vae", "pixel",
                      "--resolution", "16", "--shard-size", "16", "--workers", "0", "--no-progress")
    assert encoded.returncode == 0, encoded.stderr[-2000:]
    return root / "latents", root / "images" / "val"


def test_four_families_at_one_budget_give_finite_points_and_a_plot(shapes, tmp_path):
    latents, ref = shapes
    out = tmp_path / "results.jsonl"
    # One evaluation point (each is three processes per family, ~20 s here); the resumed segments of --points > 1
    # are `mdt train --resume` with a raised budget, tested in test_train.py.
    result = compare("--data", str(latents), "--ref", str(ref), "--size", "T", "--budget-seconds", "2",
                     "--points", "1", "--num-samples", "6", "--sample-steps", "3", "--val-every", "5",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [json.loads(line) for line in result.stdout.splitlines()] == lines  # printed as written
    points = [r for r in lines if "summary" not in r]
    summaries = {r["family"]: r for r in lines if r.get("summary")}
    assert sorted(summaries) == sorted(FAMILIES)
    assert sorted(r["family"] for r in points) == sorted(FAMILIES)
    for record in points:
        summary = summaries[record["family"]]
        preset = "DiT" if record["family"] == "TREAD" else record["family"]
        assert record["model"] == summary["model"] == f"{preset}-T/2"
        assert all(math.isfinite(record[k]) and record[k] > 0 for k in ("val_loss", "fid", "wall_time_s"))
        assert record["wall_time_s"] >= 2.0
        assert 0 < record["step"] == summary["steps"]  # stopped by the budget
        assert (summary["fid"], summary["final_val_loss"]) == (record["fid"], record["val_loss"])
        assert math.isfinite(summary["images_per_s"])
        assert summary["images_per_s"] > 0
    assert summaries["MaskDiT"]["sampler"].startswith("--sampler edm-heun")
    assert summaries["DiT"]["sampler"].startswith("--sampler ddim")
    config = (tmp_path / "work" / "MDTv2" / "run" / "config.yaml").read_text()
    assert "mask_ratio: 0.3" in config
    assert "max_wall_seconds: 2.0" in config  # the paper recipe's objective
    assert summaries["TREAD"]["sampler"].startswith("--sampler edm-heun")
    tread = json.loads((tmp_path / "work" / "TREAD" / "run" / "ema" / "model_config.json").read_text())
    assert tread["routes"] == [{"ratio": 0.5, "start": 1, "end": 2}]  # paper_route at T/2's 4 blocks
    assert out.with_suffix(".png").stat().st_size > 10_000


@pytest.mark.parametrize("args, message", [
    (("--data", "nowhere", "--ref", "nowhere"), "--data nowhere is not a latent dataset"),
    (("--budget-seconds", "0"), "--budget-seconds must be a positive number of seconds"),
    (("--size", "XXL"), "--size XXL is not a model size"),
])
def test_bad_input_is_one_sentence_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "results.jsonl"
    result = compare(*args, "--out", str(out), timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert not (tmp_path / "work").exists()
