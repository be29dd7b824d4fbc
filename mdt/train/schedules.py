"""Schedules over training steps: the learning rate and MaskDiT's unmask-tuning mask ratio."""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_multiplier(schedule: str, warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step s: linear warm-up, then constant or cosine."""

    def multiplier(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def unmask_ratio(schedule: str, base_ratio: float, progress: float) -> float:
    """Mask ratio at `progress` in [0, 1] of an unmask-tuning phase.

    "zero": no masking at all; "cosine": base * cos(pi x / 2)^4, from the base ratio down to 0;
    "none": the objective's own ratio throughout.
    """
    if schedule == "none":
        return base_ratio
    if schedule == "zero":
        return 0.0
    return base_ratio * math.cos(math.pi * min(1.0, max(0.0, progress)) / 2) ** 4
