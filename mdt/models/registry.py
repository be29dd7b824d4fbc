"""Model presets: a name like `MDTv2-XL/2` is a family and a size; both are data, not classes."""

from __future__ import annotations

import dataclasses
import re

from mdt.models.config import ModelConfig
from mdt.models.transformer import DiffusionTransformer
from mdt.models.uvit import UViT

# size: (depth, width, heads). T is a tiny size for tests and CPU demos.
SIZES = {
    "T": (4, 64, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
# MDTv2's decoder depth N2 per size (4 for XL and 6 for S in the paper; B and L follow their depth).
MDTV2_DECODER_DEPTH = {"T": 2, "S": 6, "B": 6, "L": 4, "XL": 4}
# MDTv1 places the side-interpolater before the last 2 blocks at every size.
MDT_DECODER_DEPTH = 2
# MaskDiT's decoder: (blocks, width, heads), the official 8 x 512 x 16 at every size (the official
# code fixes it). T, mdt's own test size, gets a tiny one; a smaller decoder at another size is a
# departure: --set decoder_depth=/decoder_hidden_size=/decoder_num_heads=.
MASKDIT_DECODER = {"T": (2, 32, 2), "S": (8, 512, 16), "B": (8, 512, 16), "L": (8, 512, 16), "XL": (8, 512, 16)}

# MaskDM's U-ViT sizes (blocks, width, heads): the official configs' "small" (encoder_depth 13, 512 wide,
# 8 heads) and "base" (MaskDM-B: encoder_depth 12, 768, 12); either depth builds 6 in-blocks, a middle
# block and 6 out-blocks, so both are 13 blocks here. T is mdt's test size.
UVIT_SIZES = {"T": (3, 64, 4), "S": (13, 512, 8), "B": (13, 768, 12)}

FAMILY_PATCHES = {"DiT": (2, 4, 8), "MDT": (2,), "MDTv2": (2,), "MaskDiT": (2,), "UViT": (2, 4)}
FAMILY_NAMES = {"DiT": "dit", "MDT": "mdt", "MDTv2": "mdtv2", "MaskDiT": "maskdit",
                "UViT": "uvit"}  # preset prefix -> family
_NAME = re.compile(r"^(DiT|MDT|MDTv2|MaskDiT|UViT)-(T|S|B|L|XL)/(\d+)$")


def family_sizes(family: str) -> dict[str, tuple[int, int, int]]:
    return UVIT_SIZES if family == "UViT" else SIZES


def list_models() -> list[str]:
    return [f"{family}-{size}/{p}" for family, patches in FAMILY_PATCHES.items() for size in family_sizes(family)
            for p in patches]


# The input a preset is built for unless told: (input_size, in_channels, num_classes). The latent
# families take SD-VAE latents of 256 px ImageNet; the U-ViT (MaskDM) unconditional 256 px RGB pixels.
DEFAULT_INPUT = {"UViT": (256, 3, 0)}
LATENT_INPUT = (32, 4, 1000)


def model_config(name: str, *, input_size: int | None = None, in_channels: int | None = None,
                 num_classes: int | None = None, learn_sigma: bool | None = None, **overrides) -> ModelConfig:
    """The preset config for `name`, with any field overridden by keyword. `input_size`, `in_channels`
    and `num_classes` default to the family's input (`DEFAULT_INPUT`, else 4x32x32 latents and 1000
    classes); `learn_sigma` to the family's: on for DiT and MDT, off for MaskDiT (an EDM model) and
    the U-ViT (MaskDM)."""
    match = _NAME.match(name)
    if (not match or int(match.group(3)) not in FAMILY_PATCHES[match.group(1)]
            or match.group(2) not in family_sizes(match.group(1))):
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    family, size, patch = match.group(1), match.group(2), int(match.group(3))
    depth, width, heads = family_sizes(family)[size]
    default_size, default_channels, default_classes = DEFAULT_INPUT.get(family, LATENT_INPUT)
    input_size = default_size if input_size is None else input_size
    in_channels = default_channels if in_channels is None else in_channels
    num_classes = default_classes if num_classes is None else num_classes
    fields = dict(name=name, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                  learn_sigma=learn_sigma, patch_size=patch, depth=depth, hidden_size=width, num_heads=heads)
    if family == "DiT":
        fields.update(family="dit")
    elif family == "MDT":
        fields.update(family="mdt", restore="side_interpolater", decoder_depth=MDT_DECODER_DEPTH, rel_pos_bias=True,
                      learn_pos_embed=True)
    elif family == "UViT":
        fields.update(family="uvit")
    elif family == "MDTv2":
        fields.update(family="mdtv2", restore="side_interpolater", decoder_depth=MDTV2_DECODER_DEPTH[size],
                      rel_pos_bias=True, long_skips=True, input_skip=True, learn_pos_embed=True)
    else:
        blocks, dec_width, dec_heads = MASKDIT_DECODER[size]
        fields.update(family="maskdit", restore="mask_token", decoder_depth=blocks, decoder_hidden_size=dec_width,
                      decoder_num_heads=dec_heads, null_embedding="zero")
    if fields["learn_sigma"] is None:
        fields["learn_sigma"] = family not in ("MaskDiT", "UViT")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown model option(s) {sorted(unknown)}; options: {sorted(known)}")
    fields.update(overrides)
    return ModelConfig(**fields)


def build_model(config: ModelConfig) -> DiffusionTransformer | UViT:
    """A freshly initialised model of `config`'s family: the U-ViT, or the diffusion transformer."""
    return UViT(config) if config.family == "uvit" else DiffusionTransformer(config)


def create_model(name: str, **kwargs) -> DiffusionTransformer | UViT:
    """Build a freshly initialised model from its preset name (see `model_config`)."""
    return build_model(model_config(name, **kwargs))
