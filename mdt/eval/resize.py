"""The three ways an image becomes the (3, 299, 299) input of Inception: the FID modes.

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
- `pytorch-fid` (the pytorch-fid package, MaskDM's evaluation): torchvision's ToTensor (uint8 / 255
  in float32, CHW contiguous), then its InceptionV3.forward's `F.interpolate(bilinear,
  align_corners=False)` (half-pixel centres, no antialiasing) to 299 x 299, then 2x - 1.

`clean` and `adm` resize in [0, 255] and then map to Inception's range as the TF graph does,
(x - 128) / 128; `pytorch-fid` maps [0, 1] to [-1, 1] after its resize, as that package does.
Only numpy is needed for `adm` (tools/check_adm_resize.py); torch is imported when a tensor is made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

MODES = ("clean", "adm", "pytorch-fid")
MODE_NAMES = "clean (clean-fid's), adm (ADM's evaluator) or pytorch-fid (the pytorch-fid package)"
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
    """The (H, W, 3) uint8 -> (299, 299, 3) float32 [0, 255] resize of the `clean` or `adm` mode."""
    if mode == "clean":
        from cleanfid.resize import make_resizer

        return make_resizer("PIL", False, "bicubic", (SIZE, SIZE))
    if mode == "adm":
        return resize_tf_bilinear
    raise ValueError(f"mode {mode!r} has no [0, 255] resizer; choose clean or adm")


def pytorch_fid_input(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, 299, 299) float32 in [-1, 1], in pytorch-fid's order of operations."""
    import torch
    import torch.nn.functional as F

    # ToTensor: permute to CHW, make contiguous (the interpolation kernel depends on the memory layout), / 255.
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    x = F.interpolate(x[None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0]
    return 2 * x - 1


def network_input(image: np.ndarray, mode: str) -> torch.Tensor:
    """(H, W, 3) uint8 -> the (3, 299, 299) float32 tensor Inception receives in `mode`."""
    import torch

    if mode == "pytorch-fid":
        return pytorch_fid_input(image)
    if mode not in MODES:
        raise ValueError(f"unknown FID mode {mode!r}; choose one of {', '.join(MODES)}")
    resized = torch.from_numpy(np.ascontiguousarray(build_resizer(mode)(image))).permute(2, 0, 1)
    return (resized - 128) / 128  # the TF graph's Sub/Mul after its resize
