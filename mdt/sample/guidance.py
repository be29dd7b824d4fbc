"""Classifier-free guidance: the weight schedule over timesteps and a model wrapper that applies it.

The wrapper turns a class-conditional model into a guided one with the same call signature
`(x, t, y) -> output`, so samplers never know whether guidance is on (k-diffusion style).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

ScheduleName = Literal["constant", "power-cosine"]


@dataclass(frozen=True)
class GuidanceConfig:
    """How strongly, when, and on which latent channels to guide.

    scale: w; 1 turns guidance off (the unconditional half is then not evaluated at all).
    schedule: "constant" uses w at every step; "power-cosine" (MDT) ramps from 1 at t=T to w at t=0.
    power: s of the power-cosine schedule (MDT samples with w=3.8, s=4).
    channels: guide only the first `channels` latent channels (DiT and MDT guide 3 of the 4 SD-VAE
        channels and keep the conditional prediction for the rest); None guides all of them.
    """

    scale: float = 1.0
    schedule: ScheduleName = "constant"
    power: float = 4.0
    channels: int | None = None

    @property
    def enabled(self) -> bool:
        # power-cosine with w=1 is 1 everywhere too, so the scale alone decides.
        return self.scale != 1.0


def guidance_weight(t: Tensor, num_timesteps: int, config: GuidanceConfig) -> Tensor:
    """Per-sample guidance weight w_t for timesteps t (original timeline, 0 <= t < T)."""
    t = t.to(torch.float64)
    if config.schedule == "constant":
        return torch.full_like(t, config.scale)
    if config.schedule == "power-cosine":
        # MDT: w_t = 1 + (w - 1) * (1 - cos(pi * (1 - t/T)^s)) / 2
        ramp = (1.0 - torch.cos(math.pi * (1.0 - t / num_timesteps) ** config.power)) / 2.0
        return 1.0 + (config.scale - 1.0) * ramp
    raise ValueError(f"unknown guidance schedule {config.schedule!r}")


def combine_guided(cond: Tensor, uncond: Tensor, weight: Tensor, channels: int | None) -> Tensor:
    """eps = uncond + w (cond - uncond) on the guided channels; the conditional eps elsewhere.

    cond/uncond: (B, C, H, W) noise predictions; weight: (B,).
    """
    w = weight.to(cond.dtype).view(-1, *([1] * (cond.dim() - 1)))
    k = cond.shape[1] if channels is None else channels
    guided = uncond[:, :k] + w * (cond[:, :k] - uncond[:, :k])
    return torch.cat([guided, cond[:, k:]], dim=1)


class ClassifierFreeGuidance(nn.Module):
    """Wraps `model(x, t, y)`; evaluates conditional and unconditional halves in one batch.

    The output has the model's layout: C eps channels, then (with learned sigma) C variance
    channels taken from the conditional half, as DiT does. Both halves see the same x.
    """

    def __init__(
        self,
        model: nn.Module,
        config: GuidanceConfig,
        *,
        null_class: int,
        num_timesteps: int,
        latent_channels: int,
    ) -> None:
        super().__init__()
        if config.channels is not None and not 0 < config.channels <= latent_channels:
            raise ValueError(f"guided channels must be in 1..{latent_channels}, got {config.channels}")
        self.model = model
        self.config = config
        self.null_class = null_class
        self.num_timesteps = num_timesteps
        self.latent_channels = latent_channels

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        if not self.config.enabled:
            return self.model(x, t, y)
        c = self.latent_channels
        null = torch.full_like(y, self.null_class)
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2B, C or 2C, H, W)
        cond, uncond = out.chunk(2)
        eps = combine_guided(cond[:, :c], uncond[:, :c], guidance_weight(t, self.num_timesteps, self.config),
                             self.config.channels)
        return torch.cat([eps, cond[:, c:]], dim=1)
