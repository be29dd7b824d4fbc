"""Samplers: pure functions with one shared signature, each stepping a diffusers scheduler.

    sampler(denoiser, noise, labels, *, diffusion, steps, generators) -> x0 latents

`denoiser(x, t, y)` returns the model's raw output, (B, C, H, W) or (B, 2C, H, W) with learned
sigma (guidance, if any, is already inside it). `generators` holds one CPU generator per sample;
stochastic samplers draw every step's noise from them, so sample i depends only on its own seed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from mdt.diffusion.schedule import ScheduleConfig
from mdt.sample.schedulers import ddim_scheduler, ddpm_scheduler, dpmpp_scheduler

Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]


class Sampler(Protocol):
    def __call__(
        self,
        denoiser: Denoiser,
        noise: Tensor,
        labels: Tensor,
        *,
        diffusion: ScheduleConfig,
        steps: int,
        generators: list[torch.Generator],
    ) -> Tensor: ...


def _run_chain(
    scheduler: Any,
    denoiser: Denoiser,
    noise: Tensor,
    labels: Tensor,
    *,
    mean_only: bool,
    step_kwargs: dict[str, Any],
) -> Tensor:
    x = noise * scheduler.init_noise_sigma
    channels = noise.shape[1]
    for t in scheduler.timesteps:
        t_batch = t.to(x.device).expand(x.shape[0])  # (B,) original-timeline timesteps
        out = denoiser(x, t_batch, labels).float()  # (B, C or 2C, H, W)
        if mean_only:
            out = out[:, :channels]
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser,
    noise: Tensor,
    labels: Tensor,
    *,
    diffusion: ScheduleConfig,
    steps: int,
    generators: list[torch.Generator],
) -> Tensor:
    """Ancestral DDPM with the learned variance, respaced to `steps` (DiT's sampler; 250 steps in the papers)."""
    scheduler = ddpm_scheduler(diffusion, steps)
    return _run_chain(scheduler, denoiser, noise, labels, mean_only=False, step_kwargs={"generator": generators})


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    noise: Tensor,
    labels: Tensor,
    *,
    diffusion: ScheduleConfig,
    steps: int,
    generators: list[torch.Generator],
) -> Tensor:
    """Deterministic DDIM (eta = 0); DDIMScheduler does not split a 2C output, so it gets the C eps channels."""
    scheduler = ddim_scheduler(diffusion, steps)
    return _run_chain(scheduler, denoiser, noise, labels, mean_only=True, step_kwargs={"eta": 0.0})


@torch.no_grad()
def sample_dpmpp(
    denoiser: Denoiser,
    noise: Tensor,
    labels: Tensor,
    *,
    diffusion: ScheduleConfig,
    steps: int,
    generators: list[torch.Generator],
) -> Tensor:
    """DPM-Solver++(2M): deterministic, good images in 20-50 steps."""
    scheduler = dpmpp_scheduler(diffusion, steps)
    return _run_chain(scheduler, denoiser, noise, labels, mean_only=True, step_kwargs={})


SAMPLERS: dict[str, Sampler] = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpm++": sample_dpmpp}
