"""Helpers the tests share: synthetic image trees and running the CLI in a fresh process."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
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


# Every test that starts a process goes through these: `python ARGS` (or torchrun's ranks) with this
# checkout on PYTHONPATH, output captured as text, a bound on the wait.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # float kernels split work by thread count; compare like with like


def child_env(env: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """os.environ with this checkout on PYTHONPATH, updated by `env`; a None value removes the variable."""
    full = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return {key: value for key, value in full.items() if value is not None}


def python_command(*args: str, nproc: int = 1, torchrun: Sequence[str] = ()) -> list[str]:
    """`python ARGS`; with `nproc` > 1, `torchrun --standalone --nproc_per_node NPROC ARGS`; with `torchrun`
    (the launcher's own options, e.g. --nnodes/--node_rank), `torchrun TORCHRUN ARGS`."""
    if nproc > 1:
        torchrun = ["--standalone", "--nproc_per_node", str(nproc), *torchrun]
    launcher = [sys.executable, "-m", "torch.distributed.run", *torchrun] if torchrun else [sys.executable]
    return [*launcher, *args]


def run_command(
    command: Sequence[str],
    *,
    env: Mapping[str, str | None] | None = None,
    timeout: float = 120,
    cwd: Path | str = REPO_ROOT,
) -> subprocess.CompletedProcess:
    """`command` run to its end in a fresh process (environment: `child_env(env)`), output captured as text."""
    return subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, env=child_env(env),
                          cwd=cwd)


def run_python(
    *args: str,
    nproc: int = 1,
    torchrun: Sequence[str] = (),
    env: Mapping[str, str | None] | None = None,
    timeout: float = 120,
    cwd: Path | str = REPO_ROOT,
) -> subprocess.CompletedProcess:
    """`python ARGS` (a script, `-m module`, `-c code`), or under torchrun (see python_command)."""
    command = python_command(*args, nproc=nproc, torchrun=torchrun)
    return run_command(command, env=env, timeout=timeout, cwd=cwd)


def run_cli(*args: str, **options) -> subprocess.CompletedProcess:
    """`python -m mdt.cli ARGS` in a fresh process; `options` as run_python's (nproc, env, timeout, cwd)."""
    return run_python("-m", "mdt.cli", *args, **options)


def read_samples(data_dir: Path) -> list[dict]:
    """Every sample stored in an encoded latent folder, decoded, in shard order."""
    from mdt.data.manifest import read_manifest
    from mdt.data.shard_format import decode_label, decode_moments, decode_source, iter_tar_samples

    samples = []
    for shard in read_manifest(data_dir).shards:
        for raw in iter_tar_samples(data_dir / shard.name):
            samples.append(
                {
                    "key": raw.key,
                    "shard": shard.name,
                    "moments": decode_moments(raw.fields["moments.npy"]),
                    "label": decode_label(raw.fields["cls"]),
                    "source": decode_source(raw.fields["json"]),
                }
            )
    return samples


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


def cli_refusal(result) -> str:
    """The message of an `mdt` command refused in process (typer's CliRunner): exit status 2 and one
    "error: ..." line on stderr, no traceback, as from the shell."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0].removeprefix("error: ")
