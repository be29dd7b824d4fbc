"""The U-ViT of MaskDM (jiachenlei/maskdm `models/mask_uvit.py`), pixel or latent input.

Layout: patch embedding; the timestep's sinusoidal features (no MLP) as one token and, for a
conditional model, the label's embedding as a token before it; a learned position embedding over
(extra tokens + patches); `depth // 2` in-blocks, a middle block and `depth // 2` out-blocks, each
out-block fusing the mirrored in-block's output through a long skip (Linear over the
concatenation); a final LayerNorm and a Linear from each token to its patch. Blocks are plain
pre-norm transformer blocks (LayerNorm with affine weights, attention without qkv bias, exact-GELU
MLP); nothing is conditioned by adaLN.

Forward contract of every family: `model(x, t, y=None, mask=None)` -> (B, C, H, W). `y` may be
None (every sample unconditional; for a conditional model the null label `num_classes`); an
unconditional model (`num_classes=0`) takes no labels but the null label 0. With a mask (B, N)
(True = dropped) only the extra tokens and the visible patches enter the blocks, as in the official
code; the returned grid holds the prediction at visible patches and zeros at dropped ones (the
MDSM loss reads the visible pixels only).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mdt.models.attention import Attention
from mdt.models.blocks import Recomputable, set_activation_checkpointing
from mdt.models.config import ModelConfig
from mdt.models.embeddings import LabelEmbedder, PatchEmbed
from mdt.models.masking import kept_indices


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos, sin] of t times max_period^(-k / (dim / 2)), k < dim / 2: (B, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        features = torch.cat([features, torch.zeros_like(features[:, :1])], dim=-1)
    return features


class UViTBlock(Recomputable):
    """x (+ long skip through Linear(concat)) -> x + attn(LN(x)) -> x + mlp(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, skip: bool, backend: str | None):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, backend, qkv_bias=False)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, hidden))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(hidden, dim))

    def _forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.family != "uvit":
            raise ValueError(f"UViT builds the uvit family, got {cfg.family!r}")
        self.config = cfg
        dim, half = cfg.hidden_size, cfg.depth // 2
        self.num_extras = 2 if cfg.num_classes else 1
        self.x_embedder = PatchEmbed(cfg.in_channels, dim, cfg.patch_size)
        # The last row is the null label: the official `uncond_embed`.
        self.y_embedder = LabelEmbedder(cfg.num_classes, dim) if cfg.num_classes else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_extras + cfg.num_tokens, dim))

        def block(skip: bool) -> UViTBlock:
            return UViTBlock(dim, cfg.num_heads, cfg.mlp_ratio, skip=skip, backend=cfg.attention_backend)

        self.in_blocks = nn.ModuleList(block(False) for _ in range(half))
        self.mid_block = block(False)
        self.out_blocks = nn.ModuleList(block(True) for _ in range(half))
        self.norm = nn.LayerNorm(dim)
        self.final_layer = nn.Linear(dim, cfg.patch_size**2 * cfg.out_channels)
        self.initialize_weights()

    def set_activation_checkpointing(self, enabled: bool) -> None:
        set_activation_checkpointing(self, enabled)

    def initialize_weights(self) -> None:
        """The official scheme: truncated N(0, 0.02) linears and embeddings, zero biases, unit norms."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.y_embedder is not None:
            nn.init.trunc_normal_(self.y_embedder.table.weight, std=0.02)

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                     mask: torch.Tensor | None) -> None:
        cfg = self.config
        expected = (cfg.in_channels, cfg.input_size, cfg.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"{cfg.name} expects inputs of shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(x.shape)}")
        b = x.shape[0]
        if t.shape != (b,):
            raise ValueError(f"timesteps must have shape ({b},), got {tuple(t.shape)}")
        if y is not None:
            if y.shape != (b,) or y.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"labels must be integers of shape ({b},), got {tuple(y.shape)} {y.dtype}")
            if b and y.device.type == "cpu" and (y.min() < 0 or y.max() > cfg.num_classes):
                what = "an unconditional model takes only the null label 0" if not cfg.num_classes else (
                    f"labels must lie in [0, {cfg.num_classes}] ({cfg.num_classes} = null class)")
                raise ValueError(f"{what}, got [{int(y.min())}, {int(y.max())}]")
        if mask is not None and (mask.shape != (b, cfg.num_tokens) or mask.dtype != torch.bool):
            raise ValueError(f"mask must be a bool tensor of shape ({b}, {cfg.num_tokens}), "
                             f"got {tuple(mask.shape)} {mask.dtype}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        self.check_inputs(x, t, y, mask)
        cfg = self.config
        patches = self.x_embedder(x)  # (B, N, D)
        extras = [timestep_features(t, cfg.hidden_size).to(patches.dtype)[:, None]]  # time token (B, 1, D)
        if self.y_embedder is not None:
            labels = y if y is not None else torch.full_like(t, cfg.num_classes, dtype=torch.long)
            extras.insert(0, self.y_embedder(labels)[:, None])  # label token first, as the official order
        h = torch.cat([*extras, patches], dim=1) + self.pos_embed.to(patches.dtype)  # (B, E + N, D)
        keep = kept_indices(mask) if mask is not None else None  # (B, K)
        if keep is not None:
            visible = h[:, self.num_extras:].gather(1, keep[:, :, None].expand(-1, -1, h.shape[-1]))
            h = torch.cat([h[:, :self.num_extras], visible], dim=1)  # (B, E + K, D)
        skips = []
        for block in self.in_blocks:
            h = block(h)
            skips.append(h)
        h = self.mid_block(h)
        for block in self.out_blocks:
            h = block(h, skips.pop())
        out = self.final_layer(self.norm(h))[:, self.num_extras:]  # (B, K, p*p*C)
        if keep is not None:
            grid = out.new_zeros(out.shape[0], cfg.num_tokens, out.shape[-1])
            out = grid.scatter(1, keep[:, :, None].expand(-1, -1, out.shape[-1]), out)  # (B, N, p*p*C)
        return self.unpatchify(out)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C), each token's patch in (p, q, c) order -> (B, C, H, W)."""
        p, g, c = self.config.patch_size, self.config.grid_size, self.config.out_channels
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], c, g * p, g * p)
