"""Helpers the tests share: synthetic image trees and running the CLI in a fresh process."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]


def random_image(rng: np.random.Generator, size: tuple[int, int], mode: str) -> Image.Image:
    """A noisy image of `size` (w, h) in PIL `mode`."""
    w, h = size
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))  # mode I;16
    if mode == "P":
        return rgb.quantize(16)
    return rgb.convert(mode)


def encoded_bytes(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


# (class folder, file name, (w, h), mode, format): varied sizes (smaller and larger than 64 px,
# portrait and landscape), modes and formats.
GOOD_IMAGES = [
    ("cat", "a.jpg", (96, 80), "RGB", "JPEG"),
    ("cat", "b.png", (300, 140), "RGBA", "PNG"),
    ("cat", "c.JPEG", (40, 50), "L", "JPEG"),
    ("cat", "d.webp", (130, 260), "RGB", "WEBP"),
    ("dog", "e.png", (64, 64), "P", "PNG"),
    ("dog", "f.jpg", (200, 120), "CMYK", "JPEG"),
    ("dog", "g.png", (70, 90), "I;16", "PNG"),
    ("dog", "h.png", (128, 70), "LA", "PNG"),
    ("eel", "i.jpg", (257, 129), "RGB", "JPEG"),
    ("eel", "j.jpg", (65, 300), "RGB", "JPEG"),
]
BAD_FILES = ["cat/truncated.jpg", "dog/empty.JPEG", "eel/text.JPEG", "eel/dangling.jpg"]


def write_image_tree(root: Path, seed: int = 0) -> Path:
    """An ImageFolder tree with the GOOD_IMAGES and the BAD_FILES (truncated JPEG, zero bytes,
    text named .JPEG, a dangling link that cannot be opened) plus a non-image file to ignore."""
    rng = np.random.default_rng(seed)
    for class_name, name, size, mode, fmt in GOOD_IMAGES:
        (root / class_name).mkdir(parents=True, exist_ok=True)
        (root / class_name / name).write_bytes(encoded_bytes(random_image(rng, size, mode), fmt))
    jpeg = encoded_bytes(random_image(rng, (120, 100), "RGB"), "JPEG")
    (root / "cat" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "dog" / "empty.JPEG").write_bytes(b"")
    (root / "eel" / "text.JPEG").write_text("this is not an image\n")
    os.symlink(root / "nowhere.jpg", root / "eel" / "dangling.jpg")
    (root / "eel" / "notes.txt").write_text("not an input\n")
    return root


def run_cli(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python -m mdt.cli ARGS` in a fresh process with this checkout on the path."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mdt.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=REPO_ROOT,
    )


def save_tiny_vae(directory: Path) -> Path:
    """A tiny AutoencoderKL (64 px -> 4x8x8) saved the way the real SD-VAE folder is laid out."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    )
    vae.save_pretrained(directory)
    return directory


# Training runs through the CLI (tests/test_train.py and the tests that train a tiny model).
def train_args(data: Path, out: Path, model: str, steps: int, *extra: str, input_size: int | None = 8) -> list[str]:
    """A short run; the presets are built for 32x32 latents, so the 8 px data's size is asked for."""
    size = ["--set", f"model_options.input_size={input_size}"] if input_size else []
    return ["train", "--data", str(data), "--model", model, "--out", str(out), "--steps", str(steps),
            "--micro-batch", "4", "--lr", "1e-3", "--log-every", "1", "--num-workers", "0",
            "--set", "ema_decay=0.9", *size, *extra]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run) if "loss" in r}


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
