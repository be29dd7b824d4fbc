"""Sample images on disk: PNG per sample, the ADM-format npz, and a labelled grid."""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from mdt.errors import UserError
from mdt.fileio import atomic_path, check_npz, read_json_object, write_bytes


def sample_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"{index:06d}.png"


def to_uint8(pixels: Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, rounding to nearest as ADM/DiT do."""
    x = ((pixels.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: Path, image: np.ndarray) -> None:
    write_bytes(path, png_bytes(image))


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def write_npz(path: Path, image_paths: Sequence[Path], labels: Sequence[int]) -> None:
    """`arr_0` (N, H, W, 3) uint8 and `arr_1` (N,) int64, as ADM's evaluator reads them.

    Streams the images into the (uncompressed) npz one at a time, so 50k samples at 512 px do not
    need to fit in memory.
    """
    first = read_png(image_paths[0])
    shape = (len(image_paths), *first.shape)
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            for p in image_paths:
                image = read_png(p)
                if image.shape != first.shape:
                    raise ValueError(f"{p} has shape {image.shape}, expected {first.shape}")
                f.write(np.ascontiguousarray(image).tobytes())
        with zf.open("arr_1.npy", "w") as f:
            np.lib.format.write_array(f, np.asarray(labels, dtype=np.int64), allow_pickle=False)


def read_samples(samples: Path) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """(images NHWC uint8, labels, class names or None) of `mdt sample`'s folder (or its samples.npz)."""
    npz = samples / "samples.npz" if samples.is_dir() else samples
    if not npz.is_file():
        raise UserError(f"{npz} does not exist; point --samples at the --out folder of `mdt sample`")
    check_npz(npz, "--samples", "run `mdt sample` again to rewrite it")
    try:
        with np.load(npz, allow_pickle=False) as data:
            images, labels = data["arr_0"], data["arr_1"].astype(np.int64)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise UserError(f"{npz} is not a readable samples.npz with arr_0 images and arr_1 labels ({err}); run "
                        "`mdt sample` again to rewrite it") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or labels.shape != images.shape[:1]:
        raise UserError(f"{npz} holds arr_0 {images.dtype} {images.shape} and arr_1 {labels.shape}, not uint8 "
                        "(N, H, W, 3) images and N labels; run `mdt sample` again to rewrite it")
    record = npz.parent / "sample_config.json"
    names = read_json_object(record, "run `mdt sample` again").get("class_names") if record.is_file() else None
    return images, labels, names


def make_grid(images: Sequence[np.ndarray], captions: Sequence[str], *, columns: int = 8) -> Image.Image:
    """Tiles with a caption bar under each; small samples are upscaled (nearest) so captions fit."""
    h, w = images[0].shape[:2]
    scale = max(1, math.ceil(96 / w))
    tile_w, tile_h = w * scale, h * scale
    font = ImageFont.load_default()
    bar = 14
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * tile_w, rows * (tile_h + bar)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (image, caption) in enumerate(zip(images, captions, strict=True)):
        x0, y0 = (k % columns) * tile_w, (k // columns) * (tile_h + bar)
        grid.paste(Image.fromarray(image).resize((tile_w, tile_h), Image.NEAREST), (x0, y0))
        while caption and draw.textlength(caption, font=font) > tile_w - 2:
            caption = caption[:-1]  # trim long class names to the tile width
        draw.text((x0 + 1, y0 + tile_h + 1), caption, fill="black", font=font)
    return grid


def write_grid(path: Path, images: Sequence[np.ndarray], captions: Sequence[str], *, columns: int = 8) -> None:
    buffer = io.BytesIO()
    make_grid(images, captions, columns=columns).save(buffer, format="PNG")
    write_bytes(path, buffer.getvalue())
