"""Shared fixtures: a tiny AutoencoderKL on disk, the ImageNet sample, and image trees the tests write."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO_ROOT, save_tiny_vae, write_image_tree
from PIL import Image


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny AutoencoderKL (64 px -> 4x8x8) saved with save_pretrained, as the SD-VAE would be."""
    return save_tiny_vae(tmp_path_factory.mktemp("tiny-vae"))


IMAGENET_SAMPLE_VAR = "MDT_IMAGENET_SAMPLE"


def imagenet_sample_path() -> Path:
    """$MDT_IMAGENET_SAMPLE, else the sample beside the repository (CI clones with ../shared next to it)."""
    given = os.environ.get(IMAGENET_SAMPLE_VAR)
    return Path(given) if given else REPO_ROOT.parent / "shared" / "data" / "imagenet-sample"


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    """The 800-image ImageNet sample. Missing, its tests skip on a workstation and fail on CI (CI=true)."""
    path = imagenet_sample_path()
    if not path.is_dir():
        message = f"ImageNet sample not found at {path}; point {IMAGENET_SAMPLE_VAR} at the imagenet-sample folder"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    return write_image_tree(tmp_path / "images")


@pytest.fixture(scope="session")
def session_image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_tree(tmp_path_factory.mktemp("images-session") / "images")


@pytest.fixture(scope="session")
def encoded_flip(
    tmp_path_factory: pytest.TempPathFactory, session_image_tree: Path, tiny_vae_dir: Path
) -> Path:
    """The session image tree encoded at 64 px with --flip through the tiny VAE, 3 images per shard."""
    from mdt.data.encode import EncodeConfig, encode_dataset

    out = tmp_path_factory.mktemp("latents-flip") / "out"
    encode_dataset(
        EncodeConfig(
            input=str(session_image_tree),
            out=str(out),
            resolution=64,
            vae=str(tiny_vae_dir),
            shard_size=3,
            flip=True,
            batch_size=4,
            workers=0,
            progress=False,
        )
    )
    return out


@pytest.fixture(scope="session")
def pixel_latents(tmp_path_factory) -> Path:
    """4 classes x 8 images of 16 px, encoded in pixel space at 8 px (3x8x8), 8 per shard."""
    from mdt.data.encode import EncodeConfig, encode_dataset

    root = tmp_path_factory.mktemp("train-data")
    rng = np.random.default_rng(0)
    for c in range(4):
        folder = root / "images" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(8):
            base = np.zeros((16, 16, 3), np.int64)
            base[..., c % 3] = 60 + 60 * c
            pixels = np.clip(base + rng.integers(0, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    encode_dataset(EncodeConfig(input=str(root / "images"), out=str(root / "latents"), resolution=8,
                                vae="pixel", shard_size=8, workers=0, progress=False))
    return root / "latents"


# The golden trajectory tests (tests/test_official_golden.py, tests/test_maskdit_golden.py).
@pytest.fixture(params=["explicit", "sdpa"])
def attention_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> float:
    """The attention kernel for a whole trajectory, and the tolerance relative to the trajectory's scale.

    The official DiT (timm, fused attention off) multiplies out softmax(q k^T) v; SDPA's kernel
    rounds differently by ~1e-7, and with random weights and guidance scale 4 a 21-step trajectory
    grows to |x| ~ 900, where that is ~5e-4 absolute. With the official's kernel the sampler must
    reproduce the official trajectory to 5e-6 of its scale, with SDPA to 1e-5 of it. (Not bit for
    bit: the fixtures' AMD EPYC and an Intel Xeon's AVX-512 matmuls already differ by up to 2.5e-6 of the
    scale along the same trajectory.)
    """
    from mdt.models import attention as attention_module

    if request.param == "explicit":
        def explicit(q, k, v, attn_mask=None):
            return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1) @ v

        monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", explicit)
        return 5e-6
    return 1e-5
