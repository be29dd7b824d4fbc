"""Training objectives: small callable classes that own their noise, mask and loss weighting.

Every objective is called as `objective(model, x0, y, generator)` and returns a `LossOutput`.
All randomness (timesteps, noise, class dropout, masks) comes from `generator`, so a trainer that
seeds it per step makes each step reproducible. Objectives know nothing of DeepSpeed.

- DiT: eps MSE (+ Min-SNR weighting) + the VLB term that trains the learned-range variance.
- MDT/MDTv2: the same loss on a full pass and on a masked pass of the same latents at the same
  timesteps, summed 1:1; each pass draws its own noise and class dropout, as the official trainer's
  two `training_losses` calls do.
- MaskDiT: the loss on visible patches only + `mae_weight` x MAE on masked patches, whose target is
  the noisy input x_t normalised per patch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mdt.diffusion.likelihood import discretized_gaussian_log_likelihood, normal_kl
from mdt.diffusion.schedule import NoiseSchedule
from mdt.models.masking import MASKERS, check_ratio


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar to call backward() on
    parts: dict[str, torch.Tensor]  # detached scalars for logging


def parameter_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in (bf16 under DeepSpeed's bf16 mode); losses stay in fp32."""
    return next(model.parameters()).dtype


def patch_mask_to_pixels(mask: torch.Tensor, grid_size: int, patch_size: int) -> torch.Tensor:
    """(B, N) bool over tokens -> (B, 1, H, W) float over latent pixels."""
    grid = mask.float().view(-1, 1, grid_size, grid_size)
    return grid.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


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
                 learn_sigma: bool = True, min_snr_gamma: float | None = None):
        if not 0.0 <= class_dropout < 1.0:
            raise ValueError(f"class dropout must be in [0, 1), got {class_dropout}")
        self.schedule = schedule
        self.num_classes = num_classes
        self.class_dropout = class_dropout
        self.denoising_loss = DenoisingLoss(schedule, learn_sigma=learn_sigma, min_snr_gamma=min_snr_gamma)

    def draw_timesteps(self, x0: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), generator=generator,
                          device=generator_device(generator))
        return t.to(x0.device)

    def draw_noise_and_labels(self, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise, and labels with class dropout to the null class, from `generator`."""
        device = generator_device(generator)
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=torch.float32)
        drop = torch.rand(x0.shape[0], generator=generator, device=device) < self.class_dropout
        y = torch.where(drop.to(y.device), torch.full_like(y, self.num_classes), y)
        return noise.to(x0.device), y

    def draw(self, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Timesteps, noise and dropped labels for one pass."""
        t = self.draw_timesteps(x0, generator)
        return (t, *self.draw_noise_and_labels(x0, y, generator))

    def pass_loss(self, model: nn.Module, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                  noise: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = model(xt.to(parameter_dtype(model)), t, y, mask)
        return self.denoising_loss(out, x0.float(), xt, t, noise)

    def __call__(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator | None = None) -> LossOutput:
        t, noise, y = self.draw(x0, y, generator)
        xt = self.schedule.q_sample(x0.float(), t, noise)
        terms = self.pass_loss(model, x0, xt, t, y, noise)
        return combine({"": terms})


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
            drawn = torch.rand((), generator=generator, device=generator_device(generator)).cpu()
            ratio = drawn * self.mask_ratio_span + self.mask_ratio  # float32, as the official draw
        mask = self.masker(x0.shape[0], self.grid_size, ratio, generator=generator, device=x0.device)
        passes = {}
        for name, pass_mask in (("full_", None), ("masked_", mask)):
            noise, y_pass = self.draw_noise_and_labels(x0, y, generator)
            xt = self.schedule.q_sample(x0.float(), t, noise)
            passes[name] = self.pass_loss(model, x0, xt, t, y_pass, noise, pass_mask)
        return combine(passes)


class MaskDiTObjective(DiffusionObjective):
    """MaskDiT: denoising loss on visible patches + `mae_weight` x MAE loss on masked patches.

    `mask_ratio` is an attribute so that unmask tuning can lower it as training goes on; at 0 the
    objective is the plain DiT loss over all tokens.
    """

    def __init__(self, schedule: NoiseSchedule, *, grid_size: int, patch_size: int, mask_ratio: float = 0.5,
                 mae_weight: float = 0.1, masker: str = "random", **kwargs):
        super().__init__(schedule, **kwargs)
        check_ratio(mask_ratio)
        self.grid_size = grid_size
        self.patch_size = patch_size
        self.mask_ratio = mask_ratio
        self.mae_weight = mae_weight
        self.masker = MASKERS[masker]

    def __call__(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator | None = None) -> LossOutput:
        check_ratio(self.mask_ratio)
        t, noise, y = self.draw(x0, y, generator)
        xt = self.schedule.q_sample(x0.float(), t, noise)
        if self.mask_ratio == 0:
            return combine({"": self.pass_loss(model, x0, xt, t, y, noise)})
        mask = self.masker(x0.shape[0], self.grid_size, self.mask_ratio, generator=generator, device=x0.device)
        out = model(xt.to(parameter_dtype(model)), t, y, mask)
        dropped = patch_mask_to_pixels(mask, self.grid_size, self.patch_size)  # (B, 1, H, W)
        terms = self.denoising_loss(out, x0.float(), xt, t, noise, weights=1 - dropped)
        terms["mae"] = self.mae_weight * self.mae_loss(out[:, : x0.shape[1]].float(), xt, mask)
        return combine({"": terms})

    def mae_loss(self, prediction: torch.Tensor, xt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-sample MSE on masked patches against the per-patch normalised noisy input."""
        pred, target = self.patchify(prediction), self.patchify(xt)  # (B, N, p*p*C)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        per_patch = ((pred - target) ** 2).mean(-1)  # (B, N)
        return (per_patch * mask).sum(1) / mask.sum(1).clamp(min=1)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.shape
        g, p = self.grid_size, self.patch_size
        return x.reshape(b, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, p * p * c)


def generator_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def combine(passes: dict[str, dict[str, torch.Tensor]]) -> LossOutput:
    """Sum every per-sample term of every pass; report each batch-mean term under its pass prefix."""
    total = sum(term.mean() for terms in passes.values() for term in terms.values())
    parts = {f"{prefix}{name}": term.mean().detach() for prefix, terms in passes.items() for name, term in terms.items()}
    return LossOutput(loss=total, parts=parts)


def make_objective(family: str, schedule: NoiseSchedule, *, num_classes: int, grid_size: int, patch_size: int,
                   learn_sigma: bool = True, **options) -> DiffusionObjective:
    """The objective of a model family, with the papers' defaults; `options` override them.

    Defaults: MDT mask ratio 0.3; MDTv2 ratio in [0.3, 0.5] with Min-SNR-5; MaskDiT ratio 0.5 with
    MAE weight 0.1; class dropout 0.1 for all.
    """
    common = {"num_classes": num_classes, "learn_sigma": learn_sigma}
    if family == "dit":
        return DiffusionObjective(schedule, **common, **options)
    if family == "mdt":
        return MDTObjective(schedule, grid_size=grid_size, **{"mask_ratio": 0.3, **common, **options})
    if family == "mdtv2":
        defaults = {"mask_ratio": 0.3, "mask_ratio_span": 0.2, "min_snr_gamma": 5.0}
        return MDTObjective(schedule, grid_size=grid_size, **{**defaults, **common, **options})
    if family == "maskdit":
        return MaskDiTObjective(schedule, grid_size=grid_size, patch_size=patch_size,
                                **{"mask_ratio": 0.5, **common, **options})
    raise ValueError(f"no objective for model family {family!r}")
