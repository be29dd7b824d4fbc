"""One diffusion transformer for every family: embed -> encoder -> restore -> decoder -> patches.

Forward contract shared by all families: `model(x, t, y, mask=None, route_scores=None)` maps noisy latents
x (B, C, H, W), timesteps t (B,) and labels y (B,) (value `num_classes` = null class) to the
prediction for the whole grid, (B, 2C, H, W) with learned sigma. `mask` (B, N) bool marks tokens to
DROP; the encoder then really runs on the kept tokens only. `route_scores` (per configured route, a (B, N)
uniform score per grid token, in training) routes tokens around spans of encoder blocks (TREAD,
mdt.models.routing). The model draws no random numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from mdt.models.blocks import (
    FinalLayer,
    ModulatedLinear,
    Recomputable,
    TransformerBlock,
    set_activation_checkpointing,
)
from mdt.models.config import ModelConfig
from mdt.models.embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d
from mdt.models.masking import kept_indices
from mdt.models.relative_position import RelativePositionBias
from mdt.models.routing import Router


def gather_tokens(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, N, D), (B, K) -> (B, K, D)."""
    return x.gather(1, keep[:, :, None].expand(-1, -1, x.shape[-1]))


def scatter_tokens(kept: torch.Tensor, keep: torch.Tensor, fill: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Place kept tokens (B, K, D) at their positions of a (B, N, D) grid filled with `fill` (1, 1, D)."""
    b, _, d = kept.shape
    grid = fill.to(kept.dtype).expand(b, num_tokens, d)
    return grid.scatter(1, keep[:, :, None].expand(-1, -1, d), kept)  # out of place: fill gets gradients


def add_position_embedding(module: nn.Module, name: str, dim: int, grid_size: int, trainable: bool) -> None:
    """Give `module` a (1, N, dim) sin-cos position embedding saved with the weights: a parameter
    (MDT trains it) or a buffer (DiT keeps it fixed; a buffer keeps it out of the optimizer)."""
    table = sincos_pos_embed_2d(dim, grid_size)[None]
    if trainable:
        module.register_parameter(name, nn.Parameter(table))
    else:
        module.register_buffer(name, table)


class Block(Recomputable, TransformerBlock):
    """A transformer block that owns its relative position bias, if the model uses one."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, grid_size: int | None,
                 skip: bool = False, backend: str | None = None, cond_dim: int | None = None):
        super().__init__(dim, num_heads, mlp_ratio, skip=skip, backend=backend, cond_dim=cond_dim)
        self.rel_pos = RelativePositionBias(grid_size, num_heads) if grid_size else None

    def _forward(self, x: torch.Tensor, c: torch.Tensor, keep: torch.Tensor | None = None,
                 skip: torch.Tensor | None = None) -> torch.Tensor:
        bias = self.rel_pos(keep) if self.rel_pos is not None else None
        return TransformerBlock.forward(self, x, c, bias, skip)


class Encoder(nn.Module):
    """A stack of blocks; with long skips the first half feeds the mirrored second half (U-ViT)."""

    def __init__(self, cfg: ModelConfig, depth: int, grid_size: int | None):
        super().__init__()
        self.routes = cfg.routes
        self.num_skips = depth // 2 if cfg.long_skips else 0
        self.blocks = nn.ModuleList(
            Block(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio, grid_size=grid_size,
                  skip=i >= depth - self.num_skips, backend=cfg.attention_backend)
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor, c: torch.Tensor, keep: torch.Tensor | None,
                route_scores: list[torch.Tensor] | None = None) -> torch.Tensor:
        skips = []
        router = Router(self.routes, route_scores)  # no routes without scores: inference, validation
        for i, block in enumerate(self.blocks):
            takes_skip = i >= len(self.blocks) - self.num_skips
            x = router.before(i, x)
            with router.block_context(x):
                x = block(x, c, keep, skips.pop() if takes_skip else None)
            x = router.after(i, x)
            if i < self.num_skips:
                skips.append(x)
        return x


class SideInterpolater(nn.Module):
    """MDT: fill dropped positions with a mask token, add a learnable position embedding, run one
    block over the whole grid, and keep its output only at the dropped positions."""

    def __init__(self, cfg: ModelConfig, grid_size: int | None):
        super().__init__()
        self.num_tokens = cfg.num_tokens
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        add_position_embedding(self, "decoder_pos_embed", cfg.hidden_size, cfg.grid_size, cfg.learn_pos_embed)
        self.block = Block(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio, grid_size=grid_size,
                           backend=cfg.attention_backend)

    def forward(self, x: torch.Tensor, c: torch.Tensor, keep: torch.Tensor | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        pos = self.decoder_pos_embed.to(x.dtype)
        if keep is None:
            return x + pos  # full pass: same position embedding, no interpolation
        full = scatter_tokens(x, keep, self.mask_token, self.num_tokens) + pos  # (B, N, D)
        interpolated = self.block(full, c)
        return torch.where(mask[:, :, None], interpolated, full)


class MaskTokenDecoderInput(nn.Module):
    """MaskDiT: the decoder layer (conditioned norm + linear) maps encoder tokens to the decoder
    width, a mask token fills the dropped positions, then the decoder's fixed position embedding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_tokens = cfg.num_tokens
        self.decoder_layer = ModulatedLinear(cfg.hidden_size, cfg.decoder_hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_hidden_size))
        add_position_embedding(self, "pos_embed", cfg.decoder_hidden_size, cfg.grid_size, False)

    def forward(self, x: torch.Tensor, c: torch.Tensor, keep: torch.Tensor | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        x = self.decoder_layer(x, c)
        if keep is not None:
            x = scatter_tokens(x, keep, self.mask_token, self.num_tokens)
        return x + self.pos_embed.to(x.dtype)


class DiffusionTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.family == "uvit":
            raise ValueError(f"{cfg.name} is a U-ViT (MaskDM); build it with mdt.models.build_model(config)")
        self.config = cfg
        grid = cfg.grid_size if cfg.rel_pos_bias else None
        self.x_embedder = PatchEmbed(cfg.in_channels, cfg.hidden_size, cfg.patch_size)
        add_position_embedding(self, "pos_embed", cfg.hidden_size, cfg.grid_size, cfg.learn_pos_embed)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden_size, zero_null=cfg.null_embedding == "zero")
        self.encoder = Encoder(cfg, cfg.encoder_depth, grid)

        decoder_width, decoder_heads = cfg.hidden_size, cfg.num_heads
        self.restore: nn.Module | None = None
        if cfg.restore == "side_interpolater":
            self.restore = SideInterpolater(cfg, grid)
        elif cfg.restore == "mask_token":
            self.restore = MaskTokenDecoderInput(cfg)
            decoder_width, decoder_heads = cfg.decoder_hidden_size, cfg.decoder_num_heads or cfg.num_heads
        # MDTv2: every decoder block fuses the input embedding through its own skip projection.
        # MaskDiT: the narrower decoder and the output layer are conditioned on the encoder-width c.
        self.decoder = nn.ModuleList(
            Block(decoder_width, decoder_heads, cfg.mlp_ratio, grid_size=grid, skip=cfg.input_skip,
                  backend=cfg.attention_backend, cond_dim=cfg.hidden_size)
            for _ in range(cfg.decoder_depth)
        )
        self.final_layer = FinalLayer(decoder_width, cfg.patch_size, cfg.out_channels, cond_dim=cfg.hidden_size)
        self.initialize_weights()

    def set_activation_checkpointing(self, enabled: bool) -> None:
        set_activation_checkpointing(self, enabled)

    def initialize_weights(self) -> None:
        """DiT's scheme: Xavier linears, N(0, 0.02) embeddings, adaLN and output zeroed."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for module in self.modules():
            if isinstance(module, (TransformerBlock, ModulatedLinear)):
                nn.init.zeros_(module.adaLN_modulation[-1].weight)
                nn.init.zeros_(module.adaLN_modulation[-1].bias)
        for module in self.modules():  # output layer and MaskDiT's decoder layer start at zero
            if isinstance(module, ModulatedLinear):
                nn.init.zeros_(module.linear.weight)
                nn.init.zeros_(module.linear.bias)
        if self.restore is not None:
            nn.init.normal_(self.restore.mask_token, std=0.02)

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> None:
        cfg = self.config
        expected = (cfg.in_channels, cfg.input_size, cfg.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"{cfg.name} expects latents of shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(x.shape)}")
        b = x.shape[0]
        if t.shape != (b,) or y.shape != (b,):
            raise ValueError(f"timesteps and labels must have shape ({b},), got {tuple(t.shape)} and {tuple(y.shape)}")
        if y.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"labels must be integers, got {y.dtype}")
        # Values are checked on the CPU only: reading a GPU tensor's values makes the host wait for
        # the GPU on every forward. The data reader and the sampler check labels where they make them.
        if b and y.device.type == "cpu" and (y.min() < 0 or y.max() > cfg.num_classes):
            raise ValueError(f"labels must lie in [0, {cfg.num_classes}] ({cfg.num_classes} = null class), "
                             f"got [{int(y.min())}, {int(y.max())}]")
        if mask is not None:
            if not cfg.supports_mask:
                raise ValueError(f"{cfg.name} ({cfg.family}) has no mask token and takes no mask; pass mask=None")
            if mask.shape != (b, cfg.num_tokens) or mask.dtype != torch.bool:
                raise ValueError(f"mask must be a bool tensor of shape ({b}, {cfg.num_tokens}), "
                                 f"got {tuple(mask.shape)} {mask.dtype}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                mask: torch.Tensor | None = None, route_scores: list[torch.Tensor] | None = None) -> torch.Tensor:
        self.check_inputs(x, t, y, mask)
        self.check_route_scores(route_scores, x.shape[0])
        tokens = self.x_embedder(x)
        tokens = tokens + self.pos_embed.to(tokens.dtype)  # (B, N, D); buffers may stay fp32 under DeepSpeed bf16
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        keep = kept_indices(mask) if mask is not None else None  # (B, K)

        h = tokens if keep is None else gather_tokens(tokens, keep)  # (B, K, D)
        if keep is not None and route_scores is not None:  # masked: route among the visible tokens
            route_scores = [scores.gather(1, keep) for scores in route_scores]
        h = self.encoder(h, c, keep, route_scores)
        if self.restore is not None:
            h = self.restore(h, c, keep, mask)  # (B, N, D_dec)
        input_skip = tokens if self.config.input_skip else None
        for block in self.decoder:
            h = block(h, c, skip=input_skip)
        return self.unpatchify(self.final_layer(h, c))  # (B, C_out, H, W)

    def check_route_scores(self, scores: list[torch.Tensor] | None, batch: int) -> None:
        cfg = self.config
        if scores is not None and (len(scores) != len(cfg.routes)
                                   or any(s.shape != (batch, cfg.num_tokens) for s in scores)):
            raise ValueError(f"{cfg.name} has {len(cfg.routes)} route(s): pass as many (B, {cfg.num_tokens}) score "
                             f"tensors, one score per grid token, got {[tuple(s.shape) for s in scores]}")

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W)."""
        p, g, c = self.config.patch_size, self.config.grid_size, self.config.out_channels
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], c, g * p, g * p)
