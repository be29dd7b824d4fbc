"""Parameter and FLOP counts of a preset, computed on the meta device (no memory, no time)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from mdt.models.masking import random_mask
from mdt.models.registry import create_model


@dataclass(frozen=True)
class ModelStats:
    params: int
    forward_flops: int  # per image, full pass, 2 FLOPs per multiply-add


def model_stats(name: str, mask_ratio: float = 0.0, **options) -> ModelStats:
    with torch.device("meta"):
        model = create_model(name, **options).to("meta")  # fixed buffers are built on the CPU
        cfg = model.config
        x = torch.empty(1, cfg.in_channels, cfg.input_size, cfg.input_size)
        t = torch.zeros(1, dtype=torch.long)
        mask = random_mask(1, cfg.grid_size, mask_ratio, device="meta") if mask_ratio else None
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, t, t, mask)
    return ModelStats(sum(p.numel() for p in model.parameters()), counter.get_total_flops())
