"""A class-conditional image dataset drawn by the package itself: coloured shapes.

The demo needs data that ships with no download and that a tiny model can learn on a CPU in
minutes, yet whose classes a person (and a small classifier) can tell apart in the samples. Each
class is a shape in a colour family; position, size, hue, brightness and the background vary per
image, so the model has to learn a distribution, not one picture. Images are written in ImageNet's
folder layout (`SPLIT/<class>/<index>.png`), so `mdt encode` reads them like any image folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mdt.errors import UserError
from mdt.fileio import atomic_path

# name -> base RGB colour. Folder names sort in this order, so labels follow it.
SHAPE_CLASSES: dict[str, tuple[int, int, int]] = {
    "0-red-disc": (220, 40, 40),
    "1-green-square": (40, 190, 60),
    "2-blue-triangle": (50, 80, 230),
    "3-yellow-cross": (235, 215, 40),
    "4-magenta-ring": (210, 50, 200),
    "5-cyan-bars": (40, 200, 210),
}
SPLIT_SEEDS = {"train": 0, "val": 1}  # so the two splits never share an image


@dataclass(frozen=True)
class ShapesConfig:
    """The options of `mdt shapes` and the keys of a recipe's shapes: section."""

    out: Path | None = None
    size: int = 16
    train_per_class: int = 400
    val_per_class: int = 50
    seed: int = 0


def draw_shape(kind: str, colour: tuple[int, int, int], size: int, rng: np.random.Generator) -> Image.Image:
    """One image of `kind` (the class name's shape word) at `size` px; the drawing is done at 4x then
    downsampled, so edges are anti-aliased like a photo's rather than jagged."""
    scale = 4
    side = size * scale
    background = tuple(int(v) for v in rng.integers(20, 110, size=3))
    image = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(image)
    jitter = rng.uniform(0.75, 1.15, size=3)
    fill = tuple(int(min(255, c * j)) for c, j in zip(colour, jitter, strict=True))
    radius = rng.uniform(0.28, 0.42) * side
    cx, cy = (rng.uniform(0.42, 0.58, size=2) * side).tolist()
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if kind == "disc":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    elif kind == "triangle":
        points = [(cx + radius * math.cos(a), cy + radius * math.sin(a))
                  for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        draw.polygon(points, fill=fill)
    elif kind == "cross":
        arm = radius * 0.35
        draw.rectangle((cx - radius, cy - arm, cx + radius, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - radius, cx + arm, cy + radius), fill=fill)
    elif kind == "ring":
        draw.ellipse(box, outline=fill, width=max(1, int(radius * 0.4)))
    elif kind == "bars":
        bar = side / 8
        for k in range(0, 8, 2):
            draw.rectangle((0, k * bar, side, (k + 1) * bar - 1), fill=fill)
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return image.resize((size, size), Image.LANCZOS)


def write_shapes_dataset(config: ShapesConfig) -> dict[str, int]:
    """Write OUT/train and OUT/val; an image already on disk is kept (re-runs are cheap and resumable).
    Returns the number of images per split."""
    if config.out is None:
        raise UserError("no output folder given; pass OUT or set out: in the recipe's shapes: section")
    if config.size < 8:
        raise UserError(f"--size {config.size} is too small to draw a shape; use 8 or more pixels")
    if config.train_per_class < 1 or config.val_per_class < 0:
        raise UserError("--train-per-class must be at least 1 and --val-per-class at least 0")
    counts = {}
    for split, per_class in (("train", config.train_per_class), ("val", config.val_per_class)):
        for label, (name, colour) in enumerate(SHAPE_CLASSES.items()):
            folder = config.out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            kind = name.split("-")[-1]
            for index in range(per_class):
                path = folder / f"{index:05d}.png"
                if path.is_file():
                    continue
                # Image (split, class, index) depends on nothing else, so a partial run resumes exactly.
                rng = np.random.default_rng([config.seed, SPLIT_SEEDS[split], label, index])
                with atomic_path(path) as tmp:
                    draw_shape(kind, colour, config.size, rng).save(tmp, format="PNG")
        counts[split] = per_class * len(SHAPE_CLASSES)
    return counts
