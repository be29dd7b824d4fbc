"""The ImageNet sample fixture: found through MDT_IMAGENET_SAMPLE, and never skipped silently on CI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import IMAGENET_SAMPLE_VAR, imagenet_sample_path
from helpers import REPO_ROOT

TEST = "tests/test_images_and_classes.py::test_shipped_synset_list_is_imagenet_1k_in_standard_order"


def run_sample_test(**env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("CI", IMAGENET_SAMPLE_VAR)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", TEST],
                          capture_output=True, text=True, cwd=REPO_ROOT, env={**full_env, **env}, timeout=300)


@pytest.mark.parametrize(("ci", "outcome"), [("true", "1 error"), ("", "1 skipped")])
def test_a_missing_sample_fails_on_ci_and_skips_elsewhere(tmp_path, ci: str, outcome: str) -> None:
    result = run_sample_test(CI=ci, **{IMAGENET_SAMPLE_VAR: str(tmp_path / "nowhere")})
    assert outcome in result.stdout and result.returncode == (1 if ci else 0), result.stdout[-2000:]
    assert f"{tmp_path / 'nowhere'}" in result.stdout and IMAGENET_SAMPLE_VAR in result.stdout


def test_the_variable_points_at_the_sample(imagenet_sample, tmp_path) -> None:
    """A copy elsewhere, named by the variable, is the one the tests read."""
    (tmp_path / "sample").symlink_to(imagenet_sample)
    result = run_sample_test(CI="true", **{IMAGENET_SAMPLE_VAR: str(tmp_path / "sample")})
    assert "1 passed" in result.stdout, result.stdout[-2000:]
    assert imagenet_sample_path() == imagenet_sample
