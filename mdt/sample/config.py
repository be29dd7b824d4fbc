"""The settings of one `mdt sample` run, and the defaults that depend on the sampler.

Light on purpose (no model or diffusers import): the command line and `mdt recipe` read it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mdt.errors import UserError
from mdt.settings import settings_dict

DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "dpm++": 25, "edm-heun": 40,  # edm-heun: MaskDiT's evaluation
                 "maskdm-ddim": 250}  # MaskDM's eval.py
ETA_SAMPLERS = {"ddim": 0.0, "maskdm-ddim": 1.0}  # the samplers that take eta, and its default
GUIDANCE_SCHEDULES = ("constant", "power-cosine")


@dataclass
class SampleConfig:
    """Field for field the options of `mdt sample` and the keys of a recipe's sample: section."""

    ckpt: Path | None = None  # a training run (its ema/) or an export folder
    out: Path | None = None
    num_samples: int = 50_000
    sampler: str = "ddpm"
    steps: int | None = None  # None: DEFAULT_STEPS[sampler]
    spacing: str | None = None  # which timesteps (mdt.diffusion.respacing); None: "linspace" for maskdm-ddim, else "even"
    eta: float | None = None  # DDIM's eta, for ddim and maskdm-ddim; None: ETA_SAMPLERS' default (0 and 1)
    churn: float = 0.0  # EDM's S_churn for edm-heun (0: deterministic), with EDM's ImageNet S_min/S_max/S_noise
    clip_x0: bool | None = None  # ddpm/ddim clamp x0 to [-1, 1]; None: for pixel data (ADM), not for latents (DiT)
    cfg_scale: float = 1.5  # classifier-free guidance w (mdt.sample.guidance.GuidanceConfig); 1: off
    cfg_schedule: str = "constant"
    cfg_power: float = 4.0
    cfg_channels: int | None = None  # guide the first N latent channels; None: all
    classes: str = "random"  # random | balanced | comma list of class indices (a recipe may give a YAML list)
    seed: int = 0
    batch_size: int = 32
    vae: str | None = None  # None: the VAE recorded in the checkpoint's data manifest
    precision: str = "fp32"
    device: str | None = None
    compile: bool | None = None  # torch.compile the model; None: on CUDA yes, on the CPU no
    progress: bool = True

    def validate(self) -> None:
        """The checks that need no checkpoint; the rest are made against it (mdt.sample.run)."""
        if self.ckpt is None:
            raise UserError("no checkpoint given; pass --ckpt RUN or set ckpt: in the recipe's sample: section")
        if self.out is None:
            raise UserError("no output folder given; pass --out DIR or set out: in the recipe's sample: section")
        if isinstance(self.classes, (list, tuple)):  # a recipe may list the classes as YAML
            self.classes = ",".join(str(c) for c in self.classes)
        if self.sampler not in DEFAULT_STEPS:
            raise UserError(f"--sampler {self.sampler!r} is unknown; choose one of {', '.join(DEFAULT_STEPS)}.")
        if self.cfg_schedule not in GUIDANCE_SCHEDULES:
            raise UserError(f"--cfg-schedule {self.cfg_schedule!r} is unknown; choose one of "
                            f"{', '.join(GUIDANCE_SCHEDULES)}.")

    @property
    def guidance(self) -> Any:
        from mdt.sample.guidance import GuidanceConfig  # torch; kept out of this module's import

        return GuidanceConfig(scale=float(self.cfg_scale), schedule=self.cfg_schedule, power=float(self.cfg_power),
                              channels=self.cfg_channels)

    @property
    def resolved_steps(self) -> int:
        return self.steps or DEFAULT_STEPS[self.sampler]

    @property
    def resolved_spacing(self) -> str:
        return self.spacing or ("linspace" if self.sampler == "maskdm-ddim" else "even")

    @property
    def resolved_eta(self) -> float | None:
        return ETA_SAMPLERS.get(self.sampler) if self.eta is None else self.eta

    def to_dict(self) -> dict[str, Any]:
        """Every setting with the sampler's defaults filled in, as `mdt recipe` prints them."""
        if self.sampler not in DEFAULT_STEPS:
            raise UserError(f"sample: sampler {self.sampler!r} is unknown; use one of {', '.join(DEFAULT_STEPS)}")
        return {**settings_dict(self), "steps": self.resolved_steps, "spacing": self.resolved_spacing,
                "eta": self.resolved_eta}
