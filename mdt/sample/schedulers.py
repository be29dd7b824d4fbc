"""Noise schedules and timestep choices, as configured diffusers schedulers.

Everything about *which* timesteps a sampler visits and *what* the noise schedule is lives here;
the solvers in `samplers.py` only step. The schedule always comes from the checkpoint's
`diffusion.json`, so a sampler cannot silently use a schedule the model was not trained with.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from mdt.diffusion.schedule import ScheduleConfig, make_betas


def _schedule_kwargs(diffusion: ScheduleConfig) -> dict[str, Any]:
    # The betas come from the same function training used, so any schedule the trainer knows
    # (linear, cosine) is matched exactly. Latents are not bounded to [-1, 1]: never threshold x0.
    return dict(
        num_train_timesteps=diffusion.num_timesteps,
        trained_betas=make_betas(diffusion).tolist(),
        prediction_type=diffusion.prediction_type,
        thresholding=False,
    )


def respaced_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """DiT/ADM respacing: `steps` evenly spaced timesteps from T-1 down to 0, descending."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps}, got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    return [int(t) for t in np.linspace(0, num_timesteps - 1, steps).round()[::-1]]


def ddpm_scheduler(diffusion: ScheduleConfig, steps: int) -> DDPMScheduler:
    """Ancestral DDPM respaced to `steps`. With learned sigma the scheduler splits the 2C output itself
    and interpolates the log-variance between the respaced posterior and beta (ADM's learned range)."""
    scheduler = DDPMScheduler(
        **_schedule_kwargs(diffusion),
        variance_type="learned_range" if diffusion.learn_sigma else "fixed_small",
        clip_sample=False,
    )
    # Custom timesteps make each step use beta_t = 1 - abar_t / abar_prev of the respaced chain.
    scheduler.set_timesteps(timesteps=respaced_timesteps(diffusion.num_timesteps, steps))
    return scheduler


def ddim_scheduler(diffusion: ScheduleConfig, steps: int) -> DDIMScheduler:
    """Deterministic DDIM (eta = 0). DDIMScheduler steps back by a fixed stride T // steps, so it gets
    the "leading" spacing (multiples of that stride), the only one whose visited timesteps agree
    with the stride; the last step lands on abar = 1."""
    scheduler = DDIMScheduler(
        **_schedule_kwargs(diffusion),
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="leading",
        steps_offset=0,
    )
    scheduler.set_timesteps(steps)
    return scheduler


def dpmpp_scheduler(diffusion: ScheduleConfig, steps: int) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (2M, data prediction) on the respaced timesteps. variance_type stays None: its
    learned-variance branch keeps channels [:3] only, wrong for 4-channel latents, so the sampler
    hands it the C mean channels."""
    scheduler = DPMSolverMultistepScheduler(
        **_schedule_kwargs(diffusion),
        algorithm_type="dpmsolver++",
        solver_order=2,
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(timesteps=respaced_timesteps(diffusion.num_timesteps, steps))
    return scheduler


SCHEDULERS = {"ddpm": ddpm_scheduler, "ddim": ddim_scheduler, "dpm++": dpmpp_scheduler}
