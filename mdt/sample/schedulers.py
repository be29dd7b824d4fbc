"""Noise schedules and timestep choices, as configured diffusers schedulers.

Everything about *which* timesteps a sampler visits and *what* the noise schedule is lives here;
the solvers in `samplers.py` only step. The schedule always comes from the checkpoint's
`diffusion.json`, so a sampler cannot silently use a schedule the model was not trained with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler


@dataclass(frozen=True)
class DiffusionSettings:
    """The training diffusion process of a checkpoint (the `diffusion.json` the trainer exports)."""

    num_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    learn_sigma: bool = True

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiffusionSettings:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def scheduler_kwargs(self) -> dict[str, Any]:
        # Latents are not bounded to [-1, 1]: never clip or threshold the predicted x0.
        return dict(
            num_train_timesteps=self.num_timesteps,
            beta_schedule=self.beta_schedule,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            prediction_type=self.prediction_type,
            thresholding=False,
        )


def respaced_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """DiT/ADM respacing: `steps` evenly spaced timesteps from T-1 down to 0, descending."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps}, got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    return [int(t) for t in np.linspace(0, num_timesteps - 1, steps).round()[::-1]]


def ddpm_scheduler(diffusion: DiffusionSettings, steps: int) -> DDPMScheduler:
    """Ancestral DDPM respaced to `steps`. With learned sigma the scheduler splits the 2C output itself
    and interpolates the log-variance between the respaced posterior and beta (ADM's learned range)."""
    scheduler = DDPMScheduler(
        **diffusion.scheduler_kwargs(),
        variance_type="learned_range" if diffusion.learn_sigma else "fixed_small",
        clip_sample=False,
    )
    # Custom timesteps make each step use beta_t = 1 - abar_t / abar_prev of the respaced chain.
    scheduler.set_timesteps(timesteps=respaced_timesteps(diffusion.num_timesteps, steps))
    return scheduler


def ddim_scheduler(diffusion: DiffusionSettings, steps: int) -> DDIMScheduler:
    """Deterministic DDIM (eta = 0). DDIMScheduler steps back by a fixed stride T // steps, so it gets
    the "leading" spacing (multiples of that stride), the only one whose visited timesteps agree
    with the stride; the last step lands on abar = 1."""
    scheduler = DDIMScheduler(
        **diffusion.scheduler_kwargs(),
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="leading",
        steps_offset=0,
    )
    scheduler.set_timesteps(steps)
    return scheduler


def dpmpp_scheduler(diffusion: DiffusionSettings, steps: int) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (2M, data prediction) on the respaced timesteps. variance_type stays None: its
    learned-variance branch keeps channels [:3] only, wrong for 4-channel latents, so the sampler
    hands it the C mean channels."""
    scheduler = DPMSolverMultistepScheduler(
        **diffusion.scheduler_kwargs(),
        algorithm_type="dpmsolver++",
        solver_order=2,
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(timesteps=respaced_timesteps(diffusion.num_timesteps, steps))
    return scheduler
