"""Model presets: a name like `MDTv2-XL/2` is a family and a size; both are data, not classes."""

from __future__ import annotations

import dataclasses
import re

from mdt.models.config import ModelConfig
from mdt.models.transformer import DiffusionTransformer

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

FAMILY_PATCHES = {"DiT": (2, 4, 8), "MDT": (2,), "MDTv2": (2,), "MaskDiT": (2,)}
FAMILY_NAMES = {"DiT": "dit", "MDT": "mdt", "MDTv2": "mdtv2", "MaskDiT": "maskdit"}  # preset prefix -> family
_NAME = re.compile(r"^(DiT|MDT|MDTv2|MaskDiT)-(T|S|B|L|XL)/(\d+)$")


def list_models() -> list[str]:
    return [f"{family}-{size}/{p}" for family, patches in FAMILY_PATCHES.items() for size in SIZES for p in patches]


def model_config(name: str, *, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000,
                 learn_sigma: bool | None = None, **overrides) -> ModelConfig:
    """The preset config for `name`, with any field overridden by keyword. `learn_sigma` defaults to
    the family's: on for DiT and MDT, off for MaskDiT (an EDM model)."""
    match = _NAME.match(name)
    if not match or int(match.group(3)) not in FAMILY_PATCHES[match.group(1)]:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    family, size, patch = match.group(1), match.group(2), int(match.group(3))
    depth, width, heads = SIZES[size]
    fields = dict(name=name, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                  learn_sigma=learn_sigma, patch_size=patch, depth=depth, hidden_size=width, num_heads=heads)
    if family == "DiT":
        fields.update(family="dit")
    elif family == "MDT":
        fields.update(family="mdt", restore="side_interpolater", decoder_depth=MDT_DECODER_DEPTH, rel_pos_bias=True,
                      learn_pos_embed=True)
    elif family == "MDTv2":
        fields.update(family="mdtv2", restore="side_interpolater", decoder_depth=MDTV2_DECODER_DEPTH[size],
                      rel_pos_bias=True, long_skips=True, input_skip=True, learn_pos_embed=True)
    else:
        blocks, dec_width, dec_heads = MASKDIT_DECODER[size]
        fields.update(family="maskdit", restore="mask_token", decoder_depth=blocks, decoder_hidden_size=dec_width,
                      decoder_num_heads=dec_heads, null_embedding="zero")
    if fields["learn_sigma"] is None:
        fields["learn_sigma"] = family != "MaskDiT"
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown model option(s) {sorted(unknown)}; options: {sorted(known)}")
    fields.update(overrides)
    return ModelConfig(**fields)


def create_model(name: str, **kwargs) -> DiffusionTransformer:
    """Build a freshly initialised model from its preset name (see `model_config`)."""
    return DiffusionTransformer(model_config(name, **kwargs))
