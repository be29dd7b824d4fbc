"""Token masks for masked diffusion training, drawn outside the model from a seeded generator.

A mask is a bool tensor (B, N) over the row-major token grid, True where a token is DROPPED.
Every sample of a batch drops the same number of tokens so the kept tokens stack into (B, K, D).
Strategies: random patches (MAE, MDT, MaskDiT) and MaskDM's block-wise and crop masks, with the
counts of jiachenlei/maskdm `datasets/masking_generator.py`: its patch masks drop int(ratio N)
tokens (`random_mask(..., num_drop=maskdm_num_drop(N, ratio))`), its block masks int(ratio N) // b^2
blocks, its crop masks keep one window of a given side.
"""

from __future__ import annotations

import math

import torch

from mdt import draws


def check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")


def _mask_from_scores(scores: torch.Tensor, num_drop: int) -> torch.Tensor:
    """Drop the `num_drop` highest-scoring positions of each row."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if num_drop:
        mask.scatter_(1, scores.topk(num_drop, dim=1).indices, True)
    return mask


def num_kept(num_tokens: int, ratio: float | torch.Tensor) -> int:
    """int(N (1 - ratio)) tokens stay, as MAE, MDT and MaskDiT count them. A tensor ratio (MDTv2 draws
    one per batch as float32) is computed in its own dtype, as the official code does."""
    return int(num_tokens * (1 - ratio))


def maskdm_num_drop(num_tokens: int, ratio: float) -> int:
    """MaskDM's patch-mask count: int(ratio N) tokens dropped (MAE's int(N (1 - ratio)) kept can keep
    one fewer: 409 instead of 410 of 4096 at 0.9)."""
    return int(ratio * num_tokens)


def random_mask(batch: int, grid_size: int, ratio: float | torch.Tensor, *, num_drop: int | None = None,
                generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Keep int(N (1 - ratio)) tokens chosen uniformly at random per sample (or drop exactly
    `num_drop`, when given); drop the rest."""
    check_ratio(ratio)
    n = grid_size * grid_size
    if num_drop is None:
        num_drop = n - num_kept(n, ratio)
    if not 0 <= num_drop < n:
        raise ValueError(f"a mask must drop between 0 and {n - 1} of {n} tokens, got {num_drop}")
    scores = draws.rand(generator, (batch, n))
    return _mask_from_scores(scores, num_drop).to(device)


def block_mask(batch: int, grid_size: int, ratio: float, *, block: int = 2,
               generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Drop whole block x block groups of tokens (MaskDM's block-wise masking): int(ratio N) // block^2
    blocks, chosen uniformly at random per sample, as the official generator counts them."""
    check_ratio(ratio)
    if block < 1 or grid_size % block:
        raise ValueError(f"block size {block} must divide the token grid size {grid_size}")
    groups = grid_size // block
    scores = draws.rand(generator, (batch, groups * groups))
    num_drop = int(ratio * grid_size * grid_size) // (block * block)
    group_mask = _mask_from_scores(scores, num_drop).view(batch, groups, groups)
    mask = group_mask.repeat_interleave(block, dim=1).repeat_interleave(block, dim=2)
    return mask.reshape(batch, -1).to(device)


def crop_mask(batch: int, grid_size: int, ratio: float, *, size: int | None = None,
              generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Keep one contiguous square window at a random place (top-left corner uniform over the places
    it fits): of side `size` tokens (MaskDM's crop size; `ratio` is then not used), or of about
    (1 - ratio) * N tokens."""
    check_ratio(ratio)
    if size is not None and not 1 <= size <= grid_size:
        raise ValueError(f"crop size {size} must lie in [1, {grid_size}], the token grid's side")
    side = size or max(1, min(grid_size, round(math.sqrt((1.0 - ratio) * grid_size * grid_size))))
    span = grid_size - side + 1
    top, left = draws.randint(generator, span, (batch,)), draws.randint(generator, span, (batch,))
    coords = torch.arange(grid_size, device=draws.device_of(generator))
    rows_in = (coords[None] >= top[:, None]) & (coords[None] < top[:, None] + side)  # (B, g)
    cols_in = (coords[None] >= left[:, None]) & (coords[None] < left[:, None] + side)
    keep = rows_in[:, :, None] & cols_in[:, None, :]
    return (~keep).reshape(batch, -1).to(device)


MASKERS = {"random": random_mask, "block": block_mask, "crop": crop_mask}


def kept_indices(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the kept tokens of each row, in increasing order: (B, K).

    Raises ValueError unless every row keeps the same number of tokens.
    """
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (B, N), got {tuple(mask.shape)} {mask.dtype}")
    # One read of the counts (on a GPU, one wait): the number kept sets the output's shape.
    fewest, most = torch.stack(torch.aminmax((~mask).sum(dim=1))).tolist()
    if fewest != most:
        raise ValueError("every sample of a batch must drop the same number of tokens")
    if most == 0:
        raise ValueError("a mask must keep at least one token")
    # Stable sort puts kept positions (False -> 0) first, each group in index order.
    order = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices
    return order[:, :most]
