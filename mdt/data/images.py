"""Image decoding and ADM preprocessing (the crop DiT, MDT and MaskDiT train on).

`preprocess` turns encoded image bytes into a uint8 RGB array of `resolution` x `resolution`:
any PIL mode to RGB, then ADM's center crop: halve with a BOX filter while the short side is at
least twice the target, resize with BICUBIC so the short side equals the target (images smaller
than the target are upscaled), then crop the center at integer offsets. Scaling to [-1, 1] happens
on the device, so workers hand over 4x fewer bytes.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image

# Everything PIL raises for a file it cannot decode. A decoder bug elsewhere still surfaces.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes UnidentifiedImageError and truncated files
    ValueError,
    SyntaxError,  # PIL's PNG and GIF plugins raise it for malformed chunks
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # (resolution, resolution, 3) uint8
    width: int  # of the original
    height: int
    mode: str  # the original PIL mode


def preprocess(data: bytes, resolution: int) -> DecodedImage:
    """Decode `data` and return its ADM center crop; raises one of DECODE_ERRORS when unusable."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # decode now so that a truncated file fails here
        width, height = image.size
        mode = image.mode
        rgb = to_rgb(image)
    cropped = center_crop_adm(rgb, resolution)
    return DecodedImage(np.array(cropped, dtype=np.uint8), width, height, mode)  # writable, for torch


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB; transparent areas become white rather than arbitrary colours."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit greyscale: PIL's own conversion clips to 255, so rescale the range to 8 bits.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else _white_level(float(values.max()))
        grey = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def _white_level(peak: float) -> float:
    """The white of a 32-bit int or float image, guessed from its peak: [0, 1], 8 or 16 bits."""
    for white in (1.0, 255.0, 65535.0):
        if peak <= white:
            return white
    return peak


def center_crop_adm(image: Image.Image, resolution: int) -> Image.Image:
    """ADM's center crop to `resolution` x `resolution` (guided-diffusion's image_datasets.py)."""
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.Resampling.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.Resampling.BICUBIC)
    left = (image.size[0] - resolution) // 2
    top = (image.size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))
