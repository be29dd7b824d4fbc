"""Noise schedule, forward process and the training objectives of DiT, MDT/MDTv2 and MaskDiT."""

from mdt.diffusion.objectives import (
    DenoisingLoss,
    DiffusionObjective,
    LossOutput,
    MaskDiTObjective,
    MDTObjective,
    make_objective,
)
from mdt.diffusion.schedule import NoiseSchedule, ScheduleConfig

__all__ = [
    "DenoisingLoss", "DiffusionObjective", "LossOutput", "MDTObjective", "MaskDiTObjective", "NoiseSchedule",
    "ScheduleConfig", "make_objective",
]
