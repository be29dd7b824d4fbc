"""Transformer blocks with adaLN-Zero conditioning (DiT), and the output layer."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mdt.models.attention import Attention


class Recomputable(nn.Module):
    """A block whose training forward can keep only its inputs and recompute the rest in the
    backward pass (activation checkpointing, `set_activation_checkpointing`). Subclasses put their
    computation in `_forward`."""

    checkpointing = False

    def forward(self, *args, **kwargs):
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, *args, use_reentrant=False, **kwargs)
        return self._forward(*args, **kwargs)


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Recompute every block's activations in the backward pass (less memory, ~1/3 more compute)."""
    for module in model.modules():
        if isinstance(module, Recomputable):
            module.checkpointing = enabled


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm attention + MLP, each scaled and shifted by the condition, gated, zero-initialised.

    With `skip=True` the block first fuses a long-skip input (U-ViT): Linear(concat(x, skip)).
    `cond_dim` is the condition's width when it differs from the block's (MaskDiT's decoder).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, skip: bool = False,
                 backend: str | None = None, cond_dim: int | None = None):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, backend)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None = None,
                skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a), bias)
        x = x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x


class ModulatedLinear(nn.Module):
    """Conditioned norm (shift and scale from the condition), then a linear map: DiT's output layer
    (each token to its patch of output channels) and MaskDiT's decoder layer (to the decoder width)."""

    def __init__(self, dim: int, out_features: int, *, cond_dim: int | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class FinalLayer(ModulatedLinear):
    def __init__(self, dim: int, patch_size: int, out_channels: int, *, cond_dim: int | None = None):
        super().__init__(dim, patch_size * patch_size * out_channels, cond_dim=cond_dim)
