"""MaskDM's objectives (jiachenlei/maskdm `gaussian_ddpm.py`): masked denoising score matching
(MDSM) for pre-training, and plain denoising score matching (DSM) for fine-tuning.

Both are one eps-prediction pass at a timestep drawn uniformly per sample: x_t = sqrt(abar_t) x_0 +
sqrt(1 - abar_t) eps, the model sees x_t with a mask of dropped patches, and the loss is the squared
(or, as the official `loss_type: l1`, absolute) error to eps averaged over the VISIBLE pixels of each
sample, then over the batch, as the official `loss_fn` reduces it. Fine-tuning is the same objective
with mask ratio 0 (the official fine-tuning configs: MASK_RATIO 0): no patch is dropped.

Masks, drawn per sample with the official counts (`mdt.models.masking`):
- "patch": int(ratio N) patches uniformly at random (the official RandomMaskingGenerator);
- "block": int(ratio N) // b^2 blocks of b x b patches (`mask_block` = b, patches per block side);
- "crop": one visible window of `crop_size` x `crop_size` patches (the ratio is not used).
Settings that cannot hold are refused when the objective is built, in one sentence.
"""

from __future__ import annotations

import torch
from torch import nn

from mdt import draws
from mdt.diffusion.objectives import (
    LossOutput,
    check_dropout,
    combine,
    drop_labels,
    masked_mean,
    parameter_dtype,
)
from mdt.diffusion.schedule import NoiseSchedule
from mdt.models.masking import block_mask, check_ratio, crop_mask, maskdm_num_drop, random_mask

STRATEGIES = ("patch", "block", "crop")
LOSSES = ("l2", "l1")


class MDSMObjective:
    """MaskDM pre-training (mask ratio > 0 or crop masks) and fine-tuning (ratio 0)."""

    def __init__(self, schedule: NoiseSchedule, *, num_classes: int, grid_size: int, patch_size: int,
                 mask_ratio: float = 0.9, masker: str = "block", mask_block: int = 4, crop_size: int | None = None,
                 loss: str = "l2", class_dropout: float = 0.0):
        if masker not in STRATEGIES:
            raise ValueError(f"mask strategy must be one of {STRATEGIES} (MaskDM's), got {masker!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        check_ratio(mask_ratio)
        check_dropout(class_dropout)
        if masker == "block" and (mask_block < 1 or grid_size % mask_block):
            raise ValueError(f"block size {mask_block} must divide the token grid size {grid_size} "
                             f"(image side / patch size {patch_size})")
        if masker == "crop":
            if crop_size is None:
                raise ValueError("crop masks need crop_size, the visible window's side in patches")
            if not 1 <= crop_size <= grid_size:
                raise ValueError(f"crop size {crop_size} must lie in [1, {grid_size}], the token grid's side "
                                 f"(image side / patch size {patch_size})")
        self.schedule = schedule
        self.num_classes = num_classes
        self.grid_size = grid_size
        self.patch_size = patch_size
        self.mask_ratio = mask_ratio
        self.masker = masker
        self.mask_block = mask_block
        self.crop_size = crop_size
        self.loss = loss
        self.class_dropout = class_dropout

    def draw_mask(self, batch: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor | None:
        """The dropped patches (B, N), or None where nothing is dropped (fine-tuning)."""
        if self.masker == "crop":
            return crop_mask(batch, self.grid_size, self.mask_ratio, size=self.crop_size, generator=generator,
                             device=device)
        if self.masker == "block":
            mask = block_mask(batch, self.grid_size, self.mask_ratio, block=self.mask_block, generator=generator,
                              device=device)
        else:
            num_drop = maskdm_num_drop(self.grid_size**2, self.mask_ratio)
            mask = random_mask(batch, self.grid_size, self.mask_ratio, num_drop=num_drop, generator=generator,
                               device=device)
        return mask if int(self.mask_ratio * self.grid_size**2) else None

    def visible_pixels(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """(B, N) dropped patches -> (B, 1, H, W) weights, 1 on visible pixels."""
        if mask is None:
            return None
        g, p = self.grid_size, self.patch_size
        visible = (~mask).view(-1, 1, g, 1, g, 1).expand(-1, -1, -1, p, -1, p)
        return visible.reshape(-1, 1, g * p, g * p).float()

    def labels(self, y: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor | None:
        if not self.num_classes or y is None:
            return None  # unconditional
        return drop_labels(y, self.num_classes, self.class_dropout, generator) if self.class_dropout else y

    def terms(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor | None, t: torch.Tensor,
              noise: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Per-sample loss at given timesteps, noise and mask (labels as the model takes them)."""
        xt = self.schedule.q_sample(x0.float(), t, noise)
        out = model(xt.to(parameter_dtype(model)), t, y, mask).float()
        error = (out - noise) ** 2 if self.loss == "l2" else (out - noise).abs()
        return {"mse" if self.loss == "l2" else "l1": masked_mean(error, self.visible_pixels(mask))}

    def __call__(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> LossOutput:
        t = draws.randint(generator, self.schedule.num_timesteps, (x0.shape[0],))
        noise = draws.randn(generator, x0.shape).to(x0.device)
        mask = self.draw_mask(x0.shape[0], generator, x0.device)
        return combine({"": self.terms(model, x0, self.labels(y, generator), t.to(x0.device), noise, mask)})

    def validation_terms(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor | None, sample_ids: torch.Tensor,
                         generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The plain loss (no mask, no class dropout) at fixed timesteps spread by sample index and
        noise from `generator`: comparable across steps, runs and the two stages."""
        t = ((sample_ids * 7919) % self.schedule.num_timesteps).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        return self.terms(model, x0, y if self.num_classes else None, t, noise, None)
