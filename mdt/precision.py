"""Numeric precision: one list of names for training and sampling, and what each name means.

    fp32      fp32 weights and math; TF32 off (MDT's and MDTv2's official training)
    tf32      fp32 weights, TF32 matmuls and convolutions on CUDA (DiT's training and sampling,
              MaskDiT's unmask tuning); the same as fp32 on a CPU
    amp-bf16  fp32 weights and optimizer, the model's forward under bf16 autocast
    amp-fp16  fp32 weights and optimizer, the model's forward under fp16 autocast, gradients through
              a GradScaler (MaskDiT pre-training and MaskDM, as accelerate runs them)
    bf16      training: DeepSpeed's bf16 (bf16 weights and activations, LayerNorm and softmax
              included, fp32 master copy in the optimizer), the fastest and least faithful mode;
              sampling: the same as amp-bf16
    auto      bf16 where CUDA supports it, else fp32 (the default of runs made before the modes
              existed, so they resume as they were trained)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from mdt.errors import UserError

PRECISIONS = ("auto", "fp32", "tf32", "amp-bf16", "amp-fp16", "bf16")
# Sample settings written before the modes existed named fp16 autocast "fp16".
_OLD_SAMPLING_NAMES = {"fp16": "amp-fp16"}
_AUTOCAST = {"amp-bf16": torch.bfloat16, "amp-fp16": torch.float16}


def check_precision(name: str, what: str) -> str:
    """`name` if it is a precision mode, else one sentence naming the modes."""
    if name not in PRECISIONS:
        raise UserError(f"{what} {name!r} is not a precision mode; choose one of {', '.join(PRECISIONS)}")
    return name


def resolve_auto(name: str) -> str:
    """The mode `auto` stands for on this machine; other names unchanged."""
    if name != "auto":
        return name
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def sampling_mode(name: str) -> str:
    """The mode a sampler runs: bf16 samples under bf16 autocast (weights stay fp32)."""
    name = resolve_auto(_OLD_SAMPLING_NAMES.get(name, name))
    check_precision(name, "--precision")
    return "amp-bf16" if name == "bf16" else name


def autocast_dtype(name: str) -> torch.dtype | None:
    """The autocast dtype of an amp mode (None for the others)."""
    return _AUTOCAST.get(name)


def set_tf32(name: str) -> None:
    """TF32 on for `tf32`, off for every other mode (torch's matmul default is off; cuDNN's is on)."""
    enabled = name == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


@contextlib.contextmanager
def autocast(name: str, device: torch.device) -> Iterator[None]:
    """The forward's autocast for an amp mode; nothing for the others."""
    dtype = autocast_dtype(name)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
