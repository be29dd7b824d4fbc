"""EDM (Karras et al. 2022) as MaskDiT trains and samples with it: preconditioning, the log-normal
training noise, the weighted denoising loss (+ MaskDiT's visible-patch average and MAE term), and
the rho-spaced sigmas of the Heun sampler.

The network keeps mdt's one contract `model(x, t, y, mask)`: under EDM it is called with the
c_in-scaled input and t = c_noise = ln(sigma) / 4, and returns the raw F; D = c_skip x + c_out F.
Coefficients are computed in float32 from a float32 sigma, as the official EDMPrecond does.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdt import draws
from mdt.diffusion.objectives import (
    LossOutput,
    check_dropout,
    combine,
    drop_labels,
    parameter_dtype,
    patchify,
)
from mdt.models.masking import MASKERS, check_ratio
from mdt.models.routing import draw_route_scores


@dataclass(frozen=True)
class EDMConfig:
    """What training and sampling need of the EDM process (written as `diffusion.json`)."""

    formulation: str = "edm"
    sigma_data: float = 0.5
    p_mean: float = -1.2  # training: ln(sigma) ~ N(p_mean, p_std^2)
    p_std: float = 1.2
    sigma_min: float = 0.002  # sampling range and the rho of the sigma spacing
    sigma_max: float = 80.0
    rho: float = 7.0
    learn_sigma: bool = False  # EDM predicts D only

    def __post_init__(self) -> None:
        if self.formulation != "edm":
            raise ValueError(f"an EDMConfig has formulation 'edm', got {self.formulation!r}")
        if self.learn_sigma:
            raise ValueError("EDM models have no learned variance; build the model with learn_sigma=False")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min} and {self.sigma_max}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def preconditioning(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """c_skip, c_out, c_in (each (B, 1, 1, 1)) and c_noise (B,), in float32."""
    s = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s * sigma_data / (s**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma_data**2 + s**2).sqrt()
    return c_skip, c_out, c_in, (s.log() / 4).flatten()


def denoise(model: nn.Module, x: Tensor, sigma: Tensor, y: Tensor, mask: Tensor | None = None, *,
            sigma_data: float = 0.5, route_scores: list[Tensor] | None = None) -> Tensor:
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise), in float32. `sigma` is (B,) or (1,)."""
    x = x.to(torch.float32)
    c_skip, c_out, c_in, c_noise = preconditioning(sigma, sigma_data)
    c_noise = c_noise.expand(x.shape[0]) if c_noise.numel() == 1 else c_noise
    scaled = (c_in * x).to(parameter_dtype(model))
    routed = {"route_scores": route_scores} if route_scores is not None else {}
    f = model(scaled, c_noise, y, **routed) if mask is None else model(scaled, c_noise, y, mask, **routed)
    return c_skip * x + c_out * f.float()


def karras_sigmas(cfg: EDMConfig, steps: int) -> list[float]:
    """EDM's sampling sigmas: rho-spaced from sigma_max to sigma_min in float64, then 0."""
    if steps < 2:
        raise ValueError(f"the EDM sampler needs at least 2 steps, got {steps}")
    i = torch.arange(steps, dtype=torch.float64)
    lo, hi = cfg.sigma_min ** (1 / cfg.rho), cfg.sigma_max ** (1 / cfg.rho)
    sigmas = (hi + i / (steps - 1) * (lo - hi)) ** cfg.rho
    return [*sigmas.tolist(), 0.0]


class EDMObjective:
    """EDM's weighted denoising loss on D; with a mask (MaskDiT) averaged per patch over the visible
    patches, plus `mae_weight` x MSE between D on the masked patches and the per-patch normalised
    noisy input. `mask_ratio` is an attribute so that unmask tuning can lower it."""

    def __init__(self, cfg: EDMConfig, *, num_classes: int, grid_size: int, patch_size: int,
                 class_dropout: float = 0.1, mask_ratio: float = 0.0, mae_weight: float = 0.0,
                 masker: str = "random", routes: int = 0):
        check_ratio(mask_ratio)
        check_dropout(class_dropout)
        self.cfg = cfg
        self.num_classes = num_classes
        self.grid_size = grid_size
        self.patch_size = patch_size
        self.class_dropout = class_dropout
        self.mask_ratio = mask_ratio
        self.mae_weight = mae_weight
        self.masker = MASKERS[masker]
        self.routes = routes  # the model's TREAD routes: their token choices are drawn last

    def weight(self, sigma: Tensor) -> Tensor:
        return (sigma**2 + self.cfg.sigma_data**2) / (sigma * self.cfg.sigma_data) ** 2

    def terms(self, model: nn.Module, x0: Tensor, y: Tensor, sigma: Tensor, noise: Tensor,
              mask: Tensor | None, route_scores: list[Tensor] | None = None) -> dict[str, Tensor]:
        """Per-sample loss terms at sigma (B,) with unit noise (B, C, H, W)."""
        x0 = x0.float()
        noisy = x0 + noise * sigma.view(-1, 1, 1, 1)
        d = denoise(model, noisy, sigma, y, mask, sigma_data=self.cfg.sigma_data, route_scores=route_scores)
        loss = self.weight(sigma).view(-1, 1, 1, 1) * (d - x0) ** 2  # (B, C, H, W)
        if mask is None:
            return {"denoise": loss.flatten(1).mean(1)}
        per_patch = F.avg_pool2d(loss.mean(dim=1), self.patch_size).flatten(1)  # (B, N)
        visible = (~mask).float()
        terms = {"denoise": (per_patch * visible).sum(1) / visible.sum(1)}
        if self.mae_weight:
            terms["mae"] = self.mae_weight * self.mae_loss(d, noisy, mask)
        return terms

    def mae_loss(self, d: Tensor, noisy: Tensor, mask: Tensor) -> Tensor:
        target = patchify(noisy, self.grid_size, self.patch_size)  # (B, N, p*p*C)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        per_patch = ((patchify(d, self.grid_size, self.patch_size) - target) ** 2).mean(-1)  # (B, N)
        dropped = mask.float()
        return (per_patch * dropped).sum(1) / dropped.sum(1)

    def __call__(self, model: nn.Module, x0: Tensor, y: Tensor, generator: torch.Generator | None = None
                 ) -> LossOutput:
        check_ratio(self.mask_ratio)
        b = x0.shape[0]
        sigma = (draws.randn(generator, (b,)) * self.cfg.p_std + self.cfg.p_mean).exp()
        noise = draws.randn(generator, x0.shape)
        y = drop_labels(y, self.num_classes, self.class_dropout, generator)
        mask = None
        if self.mask_ratio > 0:
            mask = self.masker(b, self.grid_size, self.mask_ratio, generator=generator, device=x0.device)
        scores = (draw_route_scores(self.routes, b, self.grid_size**2, generator, x0.device) if self.routes
                  else None)
        terms = self.terms(model, x0, y, sigma.to(x0.device), noise.to(x0.device), mask, scores)
        return combine({"": terms})

    def validation_terms(self, model: nn.Module, x0: Tensor, y: Tensor, sample_ids: Tensor,
                         generator: torch.Generator) -> dict[str, Tensor]:
        """The unmasked loss at fixed sigmas (quantiles of the training distribution, spread by sample
        index) and noise from `generator`: comparable across steps and runs."""
        quantile = ((sample_ids * 7919) % 1000 + 0.5) / 1000
        normal = math.sqrt(2) * torch.special.erfinv(2 * quantile.double() - 1)
        sigma = (normal * self.cfg.p_std + self.cfg.p_mean).exp().float().to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        return self.terms(model, x0, y, sigma, noise, None)


