"""Input embeddings: patches, timesteps, class labels, fixed 2-D sin-cos positions."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, (grid_size**2, dim), row-major over the grid.

    As MAE and DiT compute it: the first half of the channels encodes the column (w) coordinate,
    the second half the row, each as [sin, cos] of the coordinate times 10000^(-k / (dim/4)).
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    coords = np.arange(grid_size, dtype=np.float64)
    rows, cols = np.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def embed_1d(pos: np.ndarray) -> np.ndarray:
        angles = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    emb = np.concatenate([embed_1d(cols), embed_1d(rows)], axis=1)
    return torch.from_numpy(emb).float()


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D) with non-overlapping p x p patches."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of a (possibly fractional) timestep, then a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding table; label `num_classes` is the null class of classifier-free guidance.

    The null class has a learned row (DiT, MDT) or embeds to zero (`zero_null`: MaskDiT's bias-free
    linear map of one-hot labels, whose null label is the zero vector). Class dropout is the
    training objective's job (it swaps labels for the null index); this module has no randomness.
    """

    def __init__(self, num_classes: int, hidden_size: int, *, zero_null: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.zero_null = zero_null
        self.table = nn.Embedding(num_classes + (0 if zero_null else 1), hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if not self.zero_null:
            return self.table(y)
        real = y < self.num_classes
        return self.table(torch.where(real, y, 0)) * real[:, None].to(self.table.weight.dtype)
