"""An fp32 exponential moving average of the model's weights, updated after each optimizer step."""

from __future__ import annotations

import torch


class EMA:
    """shadow <- decay * shadow + (1 - decay) * master, on fp32 tensors.

    The trainer passes the optimizer's fp32 master partitions (not the bf16 module weights, in which
    a 0.9999 decay would vanish in rounding); under ZeRO each rank averages only its own shard.
    """

    def __init__(self, masters: list[torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = [m.detach().float().clone() for m in masters]

    @torch.no_grad()
    def update(self, masters: list[torch.Tensor]) -> None:
        torch._foreach_lerp_(self.shadow, [m.detach().float() for m in masters], 1.0 - self.decay)
