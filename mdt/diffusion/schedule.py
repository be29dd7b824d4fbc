"""The discrete Gaussian forward process: betas, q(x_t | x_0), the posterior, and p's parameters.

Coefficients are computed in float64 once and gathered per timestep as float32.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ScheduleConfig:
    """What a sampler needs to rebuild the DDPM schedule (written as `diffusion.json` with a model)."""

    formulation: str = "ddpm"
    num_timesteps: int = 1000
    beta_schedule: str = "linear"  # "linear" (DiT/MDT) or "cosine" (improved DDPM)
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    learn_sigma: bool = True

    def __post_init__(self) -> None:
        if self.formulation != "ddpm":
            raise ValueError(f"a ScheduleConfig has formulation 'ddpm', got {self.formulation!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def make_betas(cfg: ScheduleConfig) -> np.ndarray:
    if cfg.beta_schedule == "linear":
        return np.linspace(cfg.beta_start, cfg.beta_end, cfg.num_timesteps, dtype=np.float64)
    if cfg.beta_schedule == "cosine":
        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        steps = np.arange(cfg.num_timesteps, dtype=np.float64) / cfg.num_timesteps
        ratios = [alpha_bar(s + 1 / cfg.num_timesteps) / alpha_bar(s) for s in steps]
        return np.minimum(1 - np.array(ratios), 0.999)
    raise ValueError(f"beta_schedule must be 'linear' or 'cosine', got {cfg.beta_schedule!r}")


class NoiseSchedule:
    """The tables of a discrete process with the betas of `cfg`, or with `betas` given directly (a
    respaced process, see `respaced`)."""

    def __init__(self, cfg: ScheduleConfig = ScheduleConfig(), *, betas: np.ndarray | None = None):
        self.config = cfg
        betas = make_betas(cfg) if betas is None else np.asarray(betas, dtype=np.float64)
        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        as_tensor = torch.from_numpy
        self.num_timesteps = cfg.num_timesteps
        self.betas = as_tensor(betas)
        self.alphas_cumprod = as_tensor(alphas_cumprod)
        self.alphas_cumprod_prev = as_tensor(alphas_cumprod_prev)
        self.sqrt_alphas_cumprod = as_tensor(np.sqrt(alphas_cumprod))
        self.sqrt_one_minus_alphas_cumprod = as_tensor(np.sqrt(1.0 - alphas_cumprod))
        self.sqrt_recip_alphas_cumprod = as_tensor(np.sqrt(1.0 / alphas_cumprod))
        self.sqrt_recipm1_alphas_cumprod = as_tensor(np.sqrt(1.0 / alphas_cumprod - 1))
        self.posterior_variance = as_tensor(posterior_variance)
        # The posterior variance is 0 at t = 0; clip the log with the t = 1 value (ADM).
        self.posterior_log_variance_clipped = as_tensor(
            np.log(np.append(posterior_variance[1], posterior_variance[1:])))
        self.posterior_mean_coef1 = as_tensor(betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod))
        self.posterior_mean_coef2 = as_tensor(
            (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod))
        self.snr_values = as_tensor(alphas_cumprod / (1.0 - alphas_cumprod))
        self.log_betas = as_tensor(np.log(betas))
        # ADM's "fixed large" variance (learn_sigma off): beta_t, with the posterior's value at t = 0.
        self.fixed_large_log_variance = as_tensor(np.log(np.append(posterior_variance[1], betas[1:])))
        self._on_device: dict[tuple[int, torch.device], torch.Tensor] = {}

    def respaced(self, timesteps: list[int]) -> NoiseSchedule:
        """The process that visits only `timesteps` (ascending), as ADM's SpacedDiffusion builds it:
        beta'_i = 1 - abar(t_i) / abar(t_{i-1}), so that abar'_i = abar(t_i)."""
        kept = self.alphas_cumprod.numpy()[list(timesteps)]
        return NoiseSchedule(self.config, betas=1.0 - kept / np.append(1.0, kept[:-1]))

    def gather(self, values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """values[t] as float32, shaped to broadcast over a (B, ...) tensor of `ndim` dims.

        Each table is copied to t's device once: a copy from host memory makes the host wait for
        the GPU to drain, and a training step gathers about ten times.
        """
        if values.device != t.device:
            key = (id(values), t.device)
            if key not in self._on_device:
                self._on_device[key] = values.to(t.device)
            values = self._on_device[key]
        return values[t].float().reshape(-1, *([1] * (ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        return (self.gather(self.sqrt_alphas_cumprod, t, x0.dim()) * x0
                + self.gather(self.sqrt_one_minus_alphas_cumprod, t, x0.dim()) * noise)

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self.gather(self.posterior_mean_coef1, t, xt.dim()) * x0
                + self.gather(self.posterior_mean_coef2, t, xt.dim()) * xt)
        return mean, self.gather(self.posterior_log_variance_clipped, t, xt.dim()).expand_as(xt)

    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (self.gather(self.sqrt_recip_alphas_cumprod, t, xt.dim()) * xt
                - self.gather(self.sqrt_recipm1_alphas_cumprod, t, xt.dim()) * eps)

    def predict_eps(self, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return ((self.gather(self.sqrt_recip_alphas_cumprod, t, xt.dim()) * xt - x0)
                / self.gather(self.sqrt_recipm1_alphas_cumprod, t, xt.dim()))

    def p_mean_logvar(self, eps: torch.Tensor, var_values: torch.Tensor | None, xt: torch.Tensor,
                      t: torch.Tensor, clip_x0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """p(x_{t-1} | x_t) from predicted noise and the learned-range variance output in [-1, 1].

        The log-variance interpolates between the posterior's (lower) and beta_t (upper) bound;
        without a variance output (`None`) it is ADM's fixed-large one. `clip_x0` clamps the predicted
        x0 to the data range [-1, 1] before the posterior mean (ADM's clip_denoised, for pixel data).
        """
        if var_values is None:
            logvar = self.gather(self.fixed_large_log_variance, t, xt.dim()).expand_as(xt)
        else:
            min_log = self.gather(self.posterior_log_variance_clipped, t, xt.dim())
            max_log = self.gather(self.log_betas, t, xt.dim())
            frac = (var_values + 1) / 2
            logvar = frac * max_log + (1 - frac) * min_log
        x0 = self.predict_x0(xt, t, eps)
        mean, _ = self.q_posterior(x0.clamp(-1, 1) if clip_x0 else x0, xt, t)
        return mean, logvar

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        return self.gather(self.snr_values, t, 1)
