"""The optimizer the trainer and its benchmark share: AdamW with PyTorch's fused kernel."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def adamw(params: Iterable[torch.nn.Parameter], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
          weight_decay: float = 0.0) -> torch.optim.AdamW:
    # fused=True on every device (CPU kernels since torch 2.4): one pass over DeepSpeed's flat fp32
    # partition instead of a chain of whole-partition temporaries (sqrt, div, ...). On a 2-core CPU
    # this halved the optimizer step of DiT-S/2 (0.16 s -> 0.09 s).
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
