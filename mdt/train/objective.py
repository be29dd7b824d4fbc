"""What the training loop needs of a training objective (mdt.diffusion's DDPM, EDM and MDSM objectives)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, cast

if TYPE_CHECKING:
    import torch

    from mdt.diffusion import LossOutput


class Objective(Protocol):
    def __call__(self, model: Any, x0: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator | None = None) -> LossOutput:
        """The training loss of a batch (and its parts, for the log) under `generator`'s randomness."""

    def validation_terms(self, model: Any, x0: torch.Tensor, y: torch.Tensor, sample_ids: torch.Tensor,
                         generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per-sample loss terms without masks or class dropout, at fixed timesteps or sigmas."""


class MaskedObjective(Objective, Protocol):
    mask_ratio: float  # the ratio of the masked pass; unmask tuning lowers it during training


def masked(objective: Objective) -> MaskedObjective | None:
    """`objective` if it masks tokens (its mask ratio can follow a schedule and is logged), else None."""
    return cast("MaskedObjective", objective) if hasattr(objective, "mask_ratio") else None
