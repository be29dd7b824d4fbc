"""MDT's learnable relative position bias over 2-D token offsets."""

from __future__ import annotations

import torch
from torch import nn


class RelativePositionBias(nn.Module):
    """One learnable value per head for every 2-D offset of a grid x grid token layout.

    The table has (2g-1)^2 rows; `index[i, j]` is the row of the offset from token j to token i.
    For a subset of kept tokens the bias is that subset's rows and columns of the full bias.
    """

    def __init__(self, grid_size: int, num_heads: int):
        super().__init__()
        self.grid_size = grid_size
        self.table = nn.Parameter(torch.zeros((2 * grid_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.table, std=0.02)
        rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
        coords = torch.stack([rows.flatten(), cols.flatten()])  # (2, N)
        offsets = coords[:, :, None] - coords[:, None, :] + (grid_size - 1)  # (2, N, N), in [0, 2g-2]
        self.register_buffer("index", offsets[0] * (2 * grid_size - 1) + offsets[1], persistent=False)

    def forward(self, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Full bias (H, N, N) shared by the batch, or (B, H, K, K) for kept indices `keep` (B, K)."""
        if keep is None:
            return self.table[self.index].permute(2, 0, 1)  # (H, N, N)
        index = self.index[keep[:, :, None], keep[:, None, :]]  # (B, K, K)
        return self.table[index].permute(0, 3, 1, 2)  # (B, H, K, K)
