"""Real images beside samples, class by class: one row of real images, then one row of samples, per class.

FID and the class accuracy are numbers; this picture lets a reader judge at a glance whether the samples
look like the data they were trained on (shape, size, colour, background, noise).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from mdt.errors import UserError
from mdt.eval.features import list_images
from mdt.fileio import write_bytes
from mdt.sample.images import make_grid, read_samples


def _real_tile(path: Path, size: tuple[int, int]) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB").resize(size[::-1], Image.BICUBIC))
    except (OSError, ValueError) as err:  # empty, cut or not an image
        raise UserError(f"{path} cannot be read as an image ({err}); replace or remove it") from None


def write_side_by_side(real: Path, samples: Path, out: Path, per_class: int = 8) -> dict[str, int]:
    """Write `out` (PNG): for each class of the samples, `per_class` real images of that class (the first
    in sorted order, from REAL/<class>/) and then `per_class` samples of it."""
    images, labels, names = read_samples(samples)
    if not real.is_dir():
        raise UserError(f"--real {real} is not a folder; pass the real images' root (ROOT/<class>/<image>)")
    names = names or sorted(p.name for p in real.iterdir() if p.is_dir())
    tiles, captions = [], []
    for label, name in enumerate(names):
        shown = [images[i] for i in np.flatnonzero(labels == label)[:per_class]]
        if not shown:
            continue
        folder = real / name
        real_paths = list_images(folder, recursive=False)[:per_class] if folder.is_dir() else []
        if not real_paths:
            raise UserError(f"--real {real} has no images of class {name!r}; pass the images the model learned from")
        size = shown[0].shape[:2]
        tiles += [_real_tile(path, size) for path in real_paths]
        tiles += [np.zeros_like(shown[0])] * (per_class - len(real_paths))
        captions += [f"real {name}"] * per_class
        tiles += shown + [np.zeros_like(shown[0])] * (per_class - len(shown))
        captions += [f"sample {name}"] * per_class
    if not tiles:
        raise UserError(f"{samples} holds no samples of the classes {names}")
    buffer = io.BytesIO()
    make_grid(tiles, captions, columns=per_class).save(buffer, format="PNG")
    write_bytes(out, buffer.getvalue())
    return {"classes": len(tiles) // (2 * per_class), "per_class": per_class}
