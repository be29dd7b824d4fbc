"""The ImageNet sample fixture: found through MDT_IMAGENET_SAMPLE, and never skipped silently on CI."""

from __future__ import annotations

import subprocess

import pytest
from conftest import IMAGENET_SAMPLE_VAR, imagenet_sample_path
from helpers import run_python

pytestmark = pytest.mark.slow  # launches processes: `make test-fast` leaves this module out

TEST = "tests/test_images_and_classes.py::test_shipped_synset_list_is_imagenet_1k_in_standard_order"


def run_sample_test(**env: str) -> subprocess.CompletedProcess:
    """The one test in a fresh pytest, with CI and the variable unset unless given."""
    return run_python("-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", TEST,
                      env={"CI": None, IMAGENET_SAMPLE_VAR: None, **env}, timeout=300)


@pytest.mark.parametrize(("ci", "outcome"), [("true", "1 error"), ("", "1 skipped")])
def test_a_missing_sample_fails_on_ci_and_skips_elsewhere(tmp_path, ci: str, outcome: str) -> None:
    result = run_sample_test(CI=ci, **{IMAGENET_SAMPLE_VAR: str(tmp_path / "nowhere")})
    assert outcome in result.stdout, result.stdout[-2000:]
    assert result.returncode == (1 if ci else 0), result.stdout[-2000:]
    assert f"{tmp_path / 'nowhere'}" in result.stdout
    assert IMAGENET_SAMPLE_VAR in result.stdout


def test_the_variable_points_at_the_sample(imagenet_sample, tmp_path) -> None:
    """A copy elsewhere, named by the variable, is the one the tests read."""
    (tmp_path / "sample").symlink_to(imagenet_sample)
    result = run_sample_test(CI="true", **{IMAGENET_SAMPLE_VAR: str(tmp_path / "sample")})
    assert "1 passed" in result.stdout, result.stdout[-2000:]
    assert imagenet_sample_path() == imagenet_sample
