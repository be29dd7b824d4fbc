"""The model configuration: everything needed to rebuild a model, and nothing about training."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

FAMILIES = ("dit", "mdt", "mdtv2", "maskdit", "uvit")
RESTORES = ("none", "side_interpolater", "mask_token")
ROUTED_FAMILIES = ("dit", "maskdit")  # TREAD's routes: DiT, and MaskDiT's encoder (after its masking)


@dataclass(frozen=True)
class Route:
    """TREAD (Krause et al. 2025): in training, `ratio` of the tokens entering block `start` skip the
    blocks `start`..`end` (both included) and rejoin, as they were before `start`, after `end`."""

    ratio: float
    start: int
    end: int


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a diffusion transformer; a family is a preset of these switches.

    - DiT: `depth` plain blocks, no masking.
    - MDT (v1): `depth - decoder_depth` encoder blocks, the side-interpolater (masked pass only),
      `decoder_depth` decoder blocks; relative position bias everywhere; trainable position
      embeddings (`learn_pos_embed`) before the encoder and before the decoder.
    - MDTv2: as MDT, plus U-ViT long skips across the encoder (`long_skips`) and, in every decoder
      block, a skip projection over concat(tokens, input embedding) (`input_skip`).
    - MaskDiT: `depth` encoder blocks on visible tokens, a decoder layer (conditioned norm + linear)
      to `decoder_hidden_size`, mask tokens, then `decoder_depth` blocks of that width on all
      tokens, conditioned on the encoder-width condition; the null class embeds to zero.
    - U-ViT (MaskDM, `mdt.models.uvit`): time (and, with classes, the label) as tokens before the
      patches, `depth` plain pre-norm blocks (an odd number: in-blocks, a middle block, out-blocks
      joined to the in-blocks by long skips), no adaLN; with a mask only the visible tokens run.
      `num_classes=0` is an unconditional model.
    """

    name: str
    family: str
    input_size: int = 32
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = True
    decoder_depth: int = 0
    decoder_hidden_size: int = 0
    decoder_num_heads: int = 0
    restore: str = "none"
    rel_pos_bias: bool = False
    long_skips: bool = False
    input_skip: bool = False
    learn_pos_embed: bool = False
    null_embedding: str = "learned"  # the null class's embedding: "learned" (DiT, MDT) or "zero" (MaskDiT)
    attention_backend: str | None = None
    routes: tuple[Route, ...] = ()  # TREAD token routing in training, in order; no parameters, none at inference

    def __post_init__(self) -> None:
        try:
            routes = tuple(r if isinstance(r, Route) else Route(**r) for r in self.routes)
        except TypeError:
            raise ValueError(f"routes must be a list of {{ratio, start, end}} mappings, got {self.routes!r}") from None
        object.__setattr__(self, "routes", routes)
        self._check_routes()
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.null_embedding not in ("learned", "zero"):
            raise ValueError(f"null_embedding must be 'learned' or 'zero', got {self.null_embedding!r}")
        if self.restore not in RESTORES:
            raise ValueError(f"restore must be one of {RESTORES}, got {self.restore!r}")
        if self.input_size % self.patch_size:
            raise ValueError(f"input size {self.input_size} is not divisible by patch size {self.patch_size}")
        if self.restore == "side_interpolater" and not 0 <= self.decoder_depth < self.depth:
            raise ValueError(f"decoder_depth must be in [0, depth={self.depth}), got {self.decoder_depth}")
        if self.restore == "mask_token" and (self.decoder_depth < 1 or self.decoder_hidden_size < 1):
            raise ValueError("a mask-token decoder needs decoder_depth >= 1 and decoder_hidden_size >= 1")
        if self.long_skips and self.encoder_depth % 2:
            raise ValueError(f"long skips pair the encoder's halves: its depth {self.encoder_depth} must be even")
        if self.restore == "none" and self.decoder_depth:
            raise ValueError("decoder_depth needs restore='side_interpolater' or 'mask_token'")
        if self.family == "uvit":
            if self.depth % 2 == 0 or self.restore != "none" or self.learn_sigma or self.num_classes < 0:
                raise ValueError(f"a U-ViT has an odd depth (in-blocks, a middle block, out-blocks), no decoder, "
                                 f"no learned sigma and num_classes >= 0; got depth={self.depth}, "
                                 f"restore={self.restore!r}, learn_sigma={self.learn_sigma}, "
                                 f"num_classes={self.num_classes}")

    def _check_routes(self) -> None:
        if self.routes and (self.family not in ROUTED_FAMILIES or self.rel_pos_bias):
            raise ValueError(f"routes (TREAD) apply to DiT and MaskDiT's encoder; {self.name} ({self.family}) "
                             "cannot route tokens: drop model_options.routes")
        last_end = -1
        for route in self.routes:
            if not 0 < route.ratio < 1:
                raise ValueError(f"a route's ratio is the share of tokens routed, in (0, 1); got {route.ratio}")
            if not last_end < route.start <= route.end < self.encoder_depth:
                raise ValueError(f"route {{start: {route.start}, end: {route.end}}} does not fit: a route spans blocks "
                                 f"start..end with 0 <= start <= end < {self.encoder_depth} (the encoder's depth), "
                                 "each starting after the previous one ends")
            last_end = route.end

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def encoder_depth(self) -> int:
        return self.depth - self.decoder_depth if self.restore == "side_interpolater" else self.depth

    @property
    def supports_mask(self) -> bool:
        return self.restore != "none" or self.family == "uvit"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}")
        return cls(**data)
