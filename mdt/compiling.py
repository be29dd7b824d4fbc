"""`torch.compile` for training and sampling: on by default on CUDA, off on the CPU.

The model is compiled in place (`nn.Module.compile`), so its state_dict keys, DeepSpeed's hooks
and the EMA see the same module. Masked passes whose kept-token count changes between batches
(MDT draws a ratio per batch) recompile once and then run with that dimension dynamic
(dynamo's automatic dynamic shapes), not once per count.
"""

from __future__ import annotations

import torch
from torch import nn

from mdt.models.attention import resolve_backend


def compile_wanted(option: bool | None, device: torch.device) -> bool:
    """`--compile` / `--no-compile`, or by default: CUDA yes; the CPU no (compiling a model there
    takes minutes, more than a short run or a test saves)."""
    return device.type == "cuda" if option is None else bool(option)


def maybe_compile(model: nn.Module, option: bool | None, device: torch.device) -> bool:
    """Compile `model` in place when wanted; returns whether it was."""
    if not compile_wanted(option, device):
        return False
    resolve_backend(None, device)  # probe the attention backends now, outside the traced code
    model.compile(dynamic=None)
    return True
