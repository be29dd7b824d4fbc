"""An fp32 exponential moving average of the model's weights, updated after each optimizer step."""

from __future__ import annotations

import torch


class EMA:
    """shadow <- decay * shadow + (1 - decay) * master, on fp32 tensors.

    The trainer passes the optimizer's fp32 master partitions (not the bf16 module weights, in which
    a 0.9999 decay would vanish in rounding); under ZeRO each rank averages only its own shard.

    With `update_after_step` or `power` set, the decay warms up as ema_pytorch's EMA (MaskDM's):
    the update after optimizer step k (counted from 0) copies the weights while k <= update_after_step,
    then uses min(decay, 1 - (1 + (k - update_after_step) / inv_gamma) ** -power). The decay is a function
    of the step alone, so a resumed run averages exactly as an uninterrupted one.
    """

    def __init__(self, masters: list[torch.Tensor], decay: float, *, update_after_step: int | None = None,
                 inv_gamma: float = 1.0, power: float | None = None):
        self.decay = decay
        self.warmup = update_after_step is not None or power is not None
        self.update_after_step = update_after_step or 0
        self.inv_gamma = inv_gamma
        self.power = power if power is not None else 2 / 3  # ema_pytorch's default
        self.shadow = [m.detach().float().clone() for m in masters]

    def decay_at(self, step: int) -> float:
        """The decay of the update that follows optimizer step `step` (0 for the first step)."""
        if not self.warmup:
            return self.decay
        epoch = step - self.update_after_step
        if epoch <= 0:
            return 0.0
        return min(self.decay, max(0.0, 1.0 - (1.0 + epoch / self.inv_gamma) ** -self.power))

    @torch.no_grad()
    def update(self, masters: list[torch.Tensor], step: int = 0) -> None:
        torch._foreach_lerp_(self.shadow, [m.detach().float() for m in masters], 1.0 - self.decay_at(step))
