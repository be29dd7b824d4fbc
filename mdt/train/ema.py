"""An fp32 exponential moving average of the model's weights, updated after each optimizer step."""

from __future__ import annotations

import torch


class EMA:
    """ema <- decay * ema + (1 - decay) * param, on fp32 copies of full (ungathered) parameters.

    The trainer feeds it the fp32 master weights (not the bf16 module weights) so that decays like
    0.9999 do not vanish in bf16 rounding.
    """

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor]) -> None:
        names = list(self.shadow)
        targets = [self.shadow[n] for n in names]
        sources = [params[n].detach().float().to(targets[0].device) for n in names]
        torch._foreach_lerp_(targets, sources, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(tensors)
        if missing:
            raise ValueError(f"EMA state is missing {sorted(missing)[:3]}")
        for name, value in self.shadow.items():
            value.copy_(tensors[name].float())
