"""The two ways an image reaches the 299 x 299 input of Inception: the FID modes.

- `clean` (clean-fid's default): each channel as a float32 PIL image ("F"), PIL BICUBIC to 299 x 299
  (PIL's bicubic is an antialiasing filter, a = -0.5, whose support widens when downsampling), no
  rounding to uint8 afterwards. This is exactly `cleanfid.resize.make_resizer("PIL", False,
  "bicubic", (299, 299))`, which is what it calls.
- `adm` (ADM's TensorFlow evaluator, and TTUR's FID code before it): the images are fed as float32
  to the 2015-12-05 Inception graph at `ExpandDims:0`, and the graph's own `ResizeBilinear` node
  (align_corners=False, no half_pixel_centers: TF1's legacy kernel) brings them to 299 x 299.
  That kernel maps output pixel i to the source coordinate i * (in / out) (no half-pixel offset),
  with top = floor, bottom = min(ceil, in - 1), and interpolates rows, then between rows, in
  float32. Written out here in numpy, in the kernel's order of operations.

Both return float32 (299, 299, 3) arrays in [0, 255]; the network then applies (x - 128) / 128.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

MODES = ("clean", "adm")
SIZE = 299


def _legacy_tf_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TF1 ResizeBilinear's (lower, upper, lerp) per output index, align_corners=False, legacy scaler."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale  # (out,) float32, as the kernel computes it
    lower = np.floor(src).astype(np.int64)
    upper = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
    lerp = (src - lower.astype(np.float32)).astype(np.float32)
    return np.maximum(lower, 0), upper, lerp


def resize_tf_bilinear(image: np.ndarray, size: int = SIZE) -> np.ndarray:
    """(H, W, C) uint8 or float -> (size, size, C) float32 with TF1's legacy ResizeBilinear."""
    x = image.astype(np.float32)
    ylo, yhi, ylerp = _legacy_tf_weights(x.shape[0], size)
    xlo, xhi, xlerp = _legacy_tf_weights(x.shape[1], size)
    xl = xlerp[None, :, None]
    top_left, top_right = x[ylo][:, xlo], x[ylo][:, xhi]
    bottom_left, bottom_right = x[yhi][:, xlo], x[yhi][:, xhi]
    top = top_left + (top_right - top_left) * xl
    bottom = bottom_left + (bottom_right - bottom_left) * xl
    return (top + (bottom - top) * ylerp[:, None, None]).astype(np.float32)


def build_resizer(mode: str) -> Callable[[np.ndarray], np.ndarray]:
    """The (H, W, 3) uint8 -> (299, 299, 3) float32 resize of `mode`."""
    if mode == "clean":
        from cleanfid.resize import make_resizer

        return make_resizer("PIL", False, "bicubic", (SIZE, SIZE))
    if mode == "adm":
        return resize_tf_bilinear
    raise ValueError(f"unknown FID mode {mode!r}; choose one of {', '.join(MODES)}")
