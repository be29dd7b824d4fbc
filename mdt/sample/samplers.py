"""Samplers: pure functions with one shared signature.

    sampler(denoiser, noise, labels, *, diffusion, timesteps, step_noise) -> x0 latents

`denoiser(x, t, y)` returns the model's raw output, (B, C, H, W) or (B, 2C, H, W) with learned
sigma (guidance, if any, is already inside it); it is called with original-timeline timesteps.
`timesteps` are the visited steps, ascending (`mdt.diffusion.respacing`). `step_noise(x)` returns
fresh N(0, I) noise shaped like x for stochastic samplers; `mdt sample` draws it from one generator
per sample, so sample i depends only on its own seed.

DDPM and DDIM compute what ADM's `p_sample_loop` / `ddim_sample_loop` (DiT, MDT) compute, on the
respaced process and with ADM's float64 tables; `maskdm-ddim` is MaskDM's own DDIM (pixel models:
x0 clipped, eta 1); DPM-Solver++ steps diffusers' scheduler. For EDM
models (MaskDiT) `timesteps` are the sigmas to visit and `edm-heun` is EDM's Heun sampler; no
diffusers scheduler reproduces its float64 state and per-step churn draw, so it is written here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from diffusers import DPMSolverMultistepScheduler
from torch import Tensor

from mdt.diffusion.edm import EDMConfig, denoise
from mdt.diffusion.schedule import NoiseSchedule, ScheduleConfig, make_betas

Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]
StepNoise = Callable[[Tensor], Tensor]


class Sampler(Protocol):
    def __call__(self, denoiser: Denoiser, noise: Tensor, labels: Tensor, *, diffusion: ScheduleConfig,
                 timesteps: list[int], step_noise: StepNoise) -> Tensor: ...


def _split(out: Tensor, channels: int, learn_sigma: bool) -> tuple[Tensor, Tensor | None]:
    out = out.float()
    return out[:, :channels], (out[:, channels:] if learn_sigma else None)


def _respaced_steps(diffusion: ScheduleConfig, timesteps: list[int], x: Tensor
                    ) -> tuple[NoiseSchedule, list[tuple[int, Tensor, Tensor]]]:
    """The respaced process and its steps from the noisiest: (i, chain index (B,), original t (B,))."""
    chain = NoiseSchedule(diffusion).respaced(timesteps)
    b = x.shape[0]
    steps = [(i, torch.full((b,), i, device=x.device), torch.full((b,), t, device=x.device))
             for i, t in reversed(list(enumerate(timesteps)))]
    return chain, steps


@torch.no_grad()
def sample_ddpm(denoiser: Denoiser, noise: Tensor, labels: Tensor, *, diffusion: ScheduleConfig,
                timesteps: list[int], step_noise: StepNoise, clip_x0: bool = False) -> Tensor:
    """Ancestral DDPM with the learned-range variance (or ADM's fixed-large one), DiT's sampler.
    `clip_x0` is ADM's clip_denoised: the predicted x0 clamped to [-1, 1] (pixel data)."""
    chain, steps = _respaced_steps(diffusion, timesteps, noise)
    x = noise.float()
    for i, index, t in steps:
        eps, var_values = _split(denoiser(x, t, labels), x.shape[1], diffusion.learn_sigma)
        mean, logvar = chain.p_mean_logvar(eps, var_values, x, index, clip_x0=clip_x0)
        z = step_noise(x)  # drawn at every step, the last too, as ADM draws it
        x = mean + torch.exp(0.5 * logvar) * z if i > 0 else mean  # no noise into x_0
    return x


def _ddim_sigma(abar: Tensor, abar_prev: Tensor, eta: float) -> Tensor:
    """DDIM's sigma_t(eta) (eq. 16 of the DDIM paper), as ADM and MaskDM compute it."""
    return eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, noise: Tensor, labels: Tensor, *, diffusion: ScheduleConfig,
                timesteps: list[int], step_noise: StepNoise, eta: float = 0.0, clip_x0: bool = False) -> Tensor:
    """ADM's `ddim_sample_loop`: eps is recomputed from the predicted x0 (clamped to [-1, 1] with
    `clip_x0`, ADM's clip_denoised); eta = 0 is deterministic, eta > 0 adds sigma_t(eta) fresh noise
    per step (none into x_0, where sigma is 0)."""
    chain, steps = _respaced_steps(diffusion, timesteps, noise)
    x = noise.float()
    for _, index, t in steps:
        eps, _ = _split(denoiser(x, t, labels), x.shape[1], diffusion.learn_sigma)
        x0 = chain.predict_x0(x, index, eps)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        eps = chain.predict_eps(x, index, x0)
        abar = chain.gather(chain.alphas_cumprod, index, x.dim())
        abar_prev = chain.gather(chain.alphas_cumprod_prev, index, x.dim())
        sigma = _ddim_sigma(abar, abar_prev, eta)
        x = x0 * abar_prev.sqrt() + (1 - abar_prev - sigma**2).sqrt() * eps
        if eta > 0:
            x = x + sigma * step_noise(x)
    return x


@torch.no_grad()
def sample_maskdm_ddim(denoiser: Denoiser, noise: Tensor, labels: Tensor, *, diffusion: ScheduleConfig,
                       timesteps: list[int], step_noise: StepNoise, eta: float = 1.0) -> Tensor:
    """MaskDM's `ddim_sample` (gaussian_ddpm.py, what its eval.py samples with): x0 is clipped to the
    pixel range [-1, 1] but the step keeps the network's own eps (ADM re-derives eps from the clipped
    x0), fresh noise at every step but the last, and the last step returns the clipped x0. Its
    default eta is eval.py's 1; its grid is the "linspace" spacing."""
    chain, steps = _respaced_steps(diffusion, timesteps, noise)
    x = noise.float()
    for i, index, t in steps:
        eps, _ = _split(denoiser(x, t, labels), x.shape[1], diffusion.learn_sigma)
        x0 = chain.predict_x0(x, index, eps).clamp(-1, 1)
        if i == 0:
            return x0
        abar = chain.gather(chain.alphas_cumprod, index, x.dim())
        abar_next = chain.gather(chain.alphas_cumprod_prev, index, x.dim())
        sigma = _ddim_sigma(abar, abar_next, eta)
        x = x0 * abar_next.sqrt() + (1 - abar_next - sigma**2).sqrt() * eps + sigma * step_noise(x)
    return x


def dpmpp_scheduler(diffusion: ScheduleConfig, timesteps: list[int]) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (2M, data prediction) on the given timesteps. variance_type stays None: its
    learned-variance branch keeps channels [:3] only, wrong for 4-channel latents, so the sampler
    hands it the C mean channels. Latents are unbounded: never threshold x0."""
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=diffusion.num_timesteps, trained_betas=make_betas(diffusion).tolist(),
        prediction_type=diffusion.prediction_type, thresholding=False, algorithm_type="dpmsolver++",
        solver_order=2, lower_order_final=True, final_sigmas_type="zero",
    )
    scheduler.set_timesteps(timesteps=sorted(timesteps, reverse=True))
    return scheduler


@torch.no_grad()
def sample_dpmpp(denoiser: Denoiser, noise: Tensor, labels: Tensor, *, diffusion: ScheduleConfig,
                 timesteps: list[int], step_noise: StepNoise) -> Tensor:
    """DPM-Solver++(2M): deterministic, good images in 20-50 steps."""
    scheduler = dpmpp_scheduler(diffusion, timesteps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = denoiser(x, t.to(x.device).expand(x.shape[0]), labels).float()
        x = scheduler.step(out[:, : noise.shape[1]], t, x).prev_sample
    return x


CLIP_SAMPLERS = ("ddpm", "ddim")  # the samplers that take clip_x0 (maskdm-ddim always clips)
SAMPLERS: dict[str, Sampler] = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpm++": sample_dpmpp,
                                 "maskdm-ddim": sample_maskdm_ddim}


@dataclass(frozen=True)
class Churn:
    """EDM's stochastic churn (Algorithm 2): gamma = min(s_churn / N, sqrt(2) - 1) for sigma in
    [s_min, s_max]; off by default (the deterministic Heun sampler MaskDiT's FIDs use)."""

    s_churn: float = 0.0
    s_min: float = 0.0
    s_max: float = float("inf")
    s_noise: float = 1.0


# EDM's ImageNet settings, what `mdt sample --churn S` uses besides S.
IMAGENET_CHURN = Churn(s_churn=40.0, s_min=0.05, s_max=50.0, s_noise=1.003)


@torch.no_grad()
def sample_edm_heun(denoiser: Denoiser, noise: Tensor, labels: Tensor, *, diffusion: EDMConfig,
                    timesteps: list[float], step_noise: StepNoise, churn: Churn = Churn()) -> Tensor:
    """EDM's Heun sampler (MaskDiT's `edm_sampler`) on the sigmas `timesteps` (descending, ending at 0):
    an Euler step and, except into sigma = 0, a second-order correction; state in float64, the
    network in float32. `denoiser` returns the raw F of an EDM model (guidance inside)."""
    sigmas = torch.tensor(timesteps, dtype=torch.float64)
    steps = len(sigmas) - 1

    def d_of(x: Tensor, sigma: Tensor) -> Tensor:
        sigma_net = sigma.to(torch.float32).reshape(1).to(x.device)
        return denoise(denoiser, x.float(), sigma_net, labels, sigma_data=diffusion.sigma_data).double()

    x = noise.double() * sigmas[0]
    for i in range(steps):
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        gamma = min(churn.s_churn / steps, math.sqrt(2) - 1) if churn.s_min <= s_cur <= churn.s_max else 0.0
        s_hat = s_cur + gamma * s_cur
        x_hat = x + (s_hat**2 - s_cur**2).sqrt() * churn.s_noise * step_noise(x)  # drawn every step, as EDM
        d_cur = (x_hat - d_of(x_hat, s_hat)) / s_hat
        x = x_hat + (s_next - s_hat) * d_cur
        if i < steps - 1:
            d_next = (x - d_of(x, s_next)) / s_next
            x = x_hat + (s_next - s_hat) * (0.5 * d_cur + 0.5 * d_next)
    return x.float()


SAMPLERS["edm-heun"] = sample_edm_heun
EDM_SAMPLERS = ("edm-heun",)
