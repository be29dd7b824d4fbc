"""Training objectives: small callable classes that own their noise, mask and loss weighting.

Every objective is called as `objective(model, x0, y, generator)` and returns a `LossOutput`.
All randomness (timesteps, noise, class dropout, masks) comes from `generator`, so a trainer that
seeds it per step makes each step reproducible; the trainer passes `mdt.draws.SampleDraws`, which
makes each sample's draws independent of how the global batch is split. Objectives know nothing of
DeepSpeed.

- DiT: eps MSE (+ Min-SNR weighting) + the VLB term that trains the learned-range variance.
- MDT/MDTv2: the same loss on a full pass and on a masked pass of the same latents at the same
  timesteps, summed 1:1; each pass draws its own noise and class dropout, as the official trainer's
  two `training_losses` calls do.
(MaskDiT's EDM objective is in `edm.py`; `process.make_objective` picks an objective.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mdt import draws
from mdt.diffusion.likelihood import discretized_gaussian_log_likelihood, normal_kl
from mdt.diffusion.schedule import NoiseSchedule
from mdt.models.masking import MASKERS, check_ratio
from mdt.models.routing import draw_route_scores


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar to call backward() on
    parts: dict[str, torch.Tensor]  # detached scalars for logging


def parameter_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in (bf16 under DeepSpeed's bf16 mode); losses stay in fp32."""
    return next(model.parameters()).dtype


def patchify(x: torch.Tensor, grid_size: int, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), each token's patch in (p, q, c) order."""
    b, c, _, _ = x.shape
    g, p = grid_size, patch_size
    return x.reshape(b, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, p * p * c)


def masked_mean(x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Per-sample mean over all non-batch dims, counting only where weights (B, 1, H, W) are 1."""
    if weights is None:
        return x.flatten(1).mean(1)
    weights = weights.expand_as(x)
    return (x * weights).flatten(1).sum(1) / weights.flatten(1).sum(1).clamp(min=1)


class DenoisingLoss:
    """Per-sample eps MSE and, for learned sigma, the variational-bound term (DiT/ADM hybrid loss)."""

    def __init__(self, schedule: NoiseSchedule, *, learn_sigma: bool = True, min_snr_gamma: float | None = None):
        self.schedule = schedule
        self.learn_sigma = learn_sigma
        self.min_snr_gamma = min_snr_gamma

    def __call__(self, model_out: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        channels = x0.shape[1]
        eps = model_out[:, :channels]
        mse = masked_mean((eps.float() - noise) ** 2, weights)
        if self.min_snr_gamma is not None:
            snr = self.schedule.snr(t)
            mse = mse * torch.clamp(snr, max=self.min_snr_gamma) / snr  # Min-SNR-gamma for eps prediction
        terms = {"mse": mse}
        if self.learn_sigma:
            terms["vb"] = self.vb_term(eps.detach().float(), model_out[:, channels:].float(), x0, xt, t, weights)
        return terms

    def vb_term(self, eps: torch.Tensor, var_values: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor,
                t: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Bits per dim of L_{t-1} (KL to the true posterior), or of the decoder NLL at t = 0.

        The mean comes from the detached eps so this term trains only the variance.
        """
        mean, logvar = self.schedule.p_mean_logvar(eps, var_values, xt, t)
        true_mean, true_logvar = self.schedule.q_posterior(x0, xt, t)
        kl = normal_kl(true_mean, true_logvar, mean, logvar) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar) / math.log(2.0)
        t_is_zero = (t == 0).view(-1, *([1] * (x0.dim() - 1)))
        return masked_mean(torch.where(t_is_zero, nll, kl), weights)


class DiffusionObjective:
    """DiT: one pass over all tokens."""

    def __init__(self, schedule: NoiseSchedule, *, num_classes: int, class_dropout: float = 0.1,
                 learn_sigma: bool = True, min_snr_gamma: float | None = None, routes: int = 0,
                 num_tokens: int = 0):
        check_dropout(class_dropout)
        self.schedule = schedule
        self.num_classes = num_classes
        self.class_dropout = class_dropout
        self.denoising_loss = DenoisingLoss(schedule, learn_sigma=learn_sigma, min_snr_gamma=min_snr_gamma)
        self.routes, self.num_tokens = routes, num_tokens  # the model's TREAD routes (DiT), drawn last

    def draw_timesteps(self, x0: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        t = draws.randint(generator, self.schedule.num_timesteps, (x0.shape[0],))
        return t.to(x0.device)

    def draw_noise_and_labels(self, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise, and labels with class dropout to the null class, from `generator`."""
        noise = draws.randn(generator, x0.shape)
        return noise.to(x0.device), drop_labels(y, self.num_classes, self.class_dropout, generator)

    def draw(self, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Timesteps, noise and dropped labels for one pass."""
        t = self.draw_timesteps(x0, generator)
        return (t, *self.draw_noise_and_labels(x0, y, generator))

    def pass_loss(self, model: nn.Module, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                  noise: torch.Tensor, mask: torch.Tensor | None = None,
                  route_scores: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        routed = {"route_scores": route_scores} if route_scores is not None else {}
        out = model(xt.to(parameter_dtype(model)), t, y, mask, **routed)
        return self.denoising_loss(out, x0.float(), xt, t, noise)

    def __call__(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator | None = None) -> LossOutput:
        t, noise, y = self.draw(x0, y, generator)
        scores = (draw_route_scores(self.routes, x0.shape[0], self.num_tokens, generator, x0.device)
                  if self.routes else None)
        xt = self.schedule.q_sample(x0.float(), t, noise)
        terms = self.pass_loss(model, x0, xt, t, y, noise, route_scores=scores)
        return combine({"": terms})


    def validation_terms(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor, sample_ids: torch.Tensor,
                         generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The plain loss (no mask, no class dropout) at fixed timesteps spread by sample index and
        noise from `generator`: comparable across steps and runs."""
        t = ((sample_ids * 7919) % self.schedule.num_timesteps).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        xt = self.schedule.q_sample(x0.float(), t, noise)
        return self.pass_loss(model, x0, xt, t, y, noise)


class MDTObjective(DiffusionObjective):
    """MDT/MDTv2: the DiT loss on a full pass plus on a masked pass at the same timesteps, summed 1:1.

    Each pass draws its own noise and class dropout (the official model drops labels inside each
    forward). The mask ratio is drawn once per batch, as float32, from
    [mask_ratio, mask_ratio + mask_ratio_span]; int(N (1 - ratio)) tokens are kept.
    """

    def __init__(self, schedule: NoiseSchedule, *, grid_size: int, mask_ratio: float = 0.3,
                 mask_ratio_span: float = 0.0, masker: str = "random", **kwargs):
        super().__init__(schedule, **kwargs)
        check_ratio(mask_ratio)
        check_ratio(mask_ratio + mask_ratio_span)
        self.grid_size = grid_size
        self.mask_ratio = mask_ratio
        self.mask_ratio_span = mask_ratio_span
        self.masker = MASKERS[masker]

    def __call__(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator | None = None) -> LossOutput:
        t = self.draw_timesteps(x0, generator)
        ratio = self.mask_ratio
        if self.mask_ratio_span:
            drawn = draws.rand_per_forward(generator).cpu()  # one ratio per forward pass
            ratio = drawn * self.mask_ratio_span + self.mask_ratio  # float32, as the official draw
        mask = self.masker(x0.shape[0], self.grid_size, ratio, generator=generator, device=x0.device)
        passes = {}
        for name, pass_mask in (("full_", None), ("masked_", mask)):
            noise, y_pass = self.draw_noise_and_labels(x0, y, generator)
            xt = self.schedule.q_sample(x0.float(), t, noise)
            passes[name] = self.pass_loss(model, x0, xt, t, y_pass, noise, pass_mask)
        return combine(passes)


def check_dropout(class_dropout: float) -> None:
    if not 0.0 <= class_dropout < 1.0:
        raise ValueError(f"class dropout must be in [0, 1), got {class_dropout}")


def drop_labels(y: torch.Tensor, num_classes: int, class_dropout: float, generator: torch.Generator | None
                ) -> torch.Tensor:
    """Each label becomes the null class `num_classes` with probability `class_dropout` (one draw per sample)."""
    drop = draws.rand(generator, (y.shape[0],)) < class_dropout
    return torch.where(drop.to(y.device), torch.full_like(y, num_classes), y)


def combine(passes: dict[str, dict[str, torch.Tensor]]) -> LossOutput:
    """Sum every per-sample term of every pass; report each batch-mean term under its pass prefix."""
    total = sum(term.mean() for terms in passes.values() for term in terms.values())
    parts = {f"{prefix}{name}": term.mean().detach() for prefix, terms in passes.items() for name, term in terms.items()}
    return LossOutput(loss=total, parts=parts)
