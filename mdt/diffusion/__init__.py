"""Diffusion processes (DDPM, EDM), the forward process and the training objectives of DiT,
MDT/MDTv2 and MaskDiT."""

from mdt.diffusion.edm import EDMConfig, EDMObjective
from mdt.diffusion.objectives import DenoisingLoss, DiffusionObjective, LossOutput, MDTObjective
from mdt.diffusion.process import DiffusionConfig, diffusion_from_dict, make_objective
from mdt.diffusion.schedule import NoiseSchedule, ScheduleConfig

__all__ = [
    "DenoisingLoss", "DiffusionConfig", "DiffusionObjective", "EDMConfig", "EDMObjective", "LossOutput",
    "MDTObjective", "NoiseSchedule", "ScheduleConfig", "diffusion_from_dict", "make_objective",
]
