"""The official DiT, MDT (v1), MDTv2 and MaskDiT state_dicts, read into mdt's model.

Recognised by their keys (facebookresearch/DiT `models.py`; sail-sg/MDT `masked_diffusion/models.py`
on branches `mdtv1` and `main`; Anima-Lab/MaskDiT `models/maskdit.py`, inside its EDM wrapper as
`model.*`). Every size a tensor holds comes from the tensors; the rest (the number of heads of DiT
and of MaskDiT's decoder, MDTv1's side-interpolater position) from the caller. Key renames only,
plus checked reductions: the official relative-position table has 3 unused rows after the
(2g-1)^2 offsets (dropped), its index buffer is compared with mdt's and dropped, and MaskDiT's
bias-free label Linear over one-hot labels becomes its transpose, an embedding table.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mdt.checkpoints import official_uvit
from mdt.errors import UserError
from mdt.models.relative_position import RelativePositionBias

FORMATS = ("dit", "mdt", "mdtv2", "maskdit", "uvit")  # uvit: MaskDM (mdt.checkpoints.official_uvit)  # official formats by the mdt family they map to
_REL_TABLE = ".attn.rel_pos_bias.relative_position_bias_table"
_REL_INDEX = ".attn.rel_pos_bias.relative_position_index"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


@dataclass(frozen=True)
class OfficialCheckpoint:
    family: str  # "dit" | "mdt" | "mdtv2" | "maskdit" | "uvit"
    dims: dict  # ModelConfig fields the tensors determine
    state_dict: dict[str, Tensor]  # official key names, wrapper prefixes removed
    schedule: dict = field(default_factory=dict)  # ScheduleConfig fields the checkpoint records (MaskDM's betas)


def strip_wrappers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove DDP/compile prefixes, and `model.` when every key has it (MaskDiT's EDMPrecond)."""
    out = {}
    for key, value in state_dict.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    if out and all(key.startswith("model.") for key in out):
        out = {key[len("model."):]: value for key, value in out.items()}
    return out


def detect_format(keys: set[str]) -> str | None:
    if any(key.startswith(("decoder_layer.", "decoder_blocks.")) for key in keys):
        return "maskdit"  # a missing tensor is then named by read_official, not mistaken for a DiT
    if "en_inblocks.0.adaLN_modulation.1.weight" in keys and "de_blocks.0.skip_linear.weight" in keys:
        return "mdtv2"
    if "sideblocks.0.adaLN_modulation.1.weight" in keys and "blocks.0.adaLN_modulation.1.weight" in keys:
        return "mdt"
    if "blocks.0.attn.qkv.weight" in keys and "y_embedder.embedding_table.weight" in keys:
        return "dit"
    return None


def _count(keys: set[str], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    if found != set(range(len(found))):
        raise UserError(f"the checkpoint's {prefix} are numbered {sorted(found)}, not 0..N-1; it is incomplete")
    return len(found)


def read_official(state_dict: dict[str, Tensor]) -> OfficialCheckpoint | None:
    """The official format and the sizes its tensors hold, or None if the keys are not official."""
    sd = strip_wrappers(state_dict)
    keys = set(sd)
    if official_uvit.is_maskdm(keys):
        weights, buffers = official_uvit.unwrap(sd)
        return OfficialCheckpoint("uvit", official_uvit.read_dims(weights), weights,
                                  official_uvit.schedule_from_buffers(buffers))
    family = detect_format(keys)
    if family is None:
        return None
    try:
        patch_weight = sd["x_embedder.proj.weight"]  # (D, C, p, p)
        hidden, in_channels, patch = patch_weight.shape[0], patch_weight.shape[1], patch_weight.shape[2]
        tokens = sd["pos_embed"].shape[1]
        grid = math.isqrt(tokens)
        first = "en_inblocks.0" if family == "mdtv2" else "blocks.0"
        out_features = sd["final_layer.linear.weight"].shape[0]
        labels = sd["y_embedder.embedding_table.weight"]  # (K + 1, D) table, or MaskDiT's (D, K) Linear
        dims = dict(
            hidden_size=hidden, in_channels=in_channels, patch_size=patch, input_size=grid * patch,
            num_classes=labels.shape[1] if family == "maskdit" else labels.shape[0] - 1,
            mlp_ratio=sd[f"{first}.mlp.fc1.weight"].shape[0] / hidden,
            learn_sigma=out_features == 2 * patch * patch * in_channels,
        )
        if family == "maskdit":
            dims.update(decoder_hidden_size=sd["decoder_layer.linear.weight"].shape[0])
    except KeyError as err:
        raise UserError(f"the checkpoint looks like an official {family} state_dict but lacks {err.args[0]}; "
                        "it is incomplete or from another version of the code") from None
    if grid * grid != tokens:
        raise UserError(f"pos_embed holds {tokens} positions, not a square grid")
    if family in ("dit", "maskdit"):
        dims["depth"] = _count(keys, "blocks")
        if family == "maskdit":
            dims["decoder_depth"] = _count(keys, "decoder_blocks")
    else:
        dims["num_heads"] = sd[f"{first}{_REL_TABLE}"].shape[1]
        if family == "mdt":
            dims["depth"] = _count(keys, "blocks")
        else:
            half, outer, decoder = _count(keys, "en_inblocks"), _count(keys, "en_outblocks"), _count(keys, "de_blocks")
            if half != outer:
                raise UserError(f"the MDTv2 checkpoint has {half} en_inblocks but {outer} en_outblocks; "
                                "they must pair up")
            dims.update(depth=2 * half + decoder, decoder_depth=decoder)
    return OfficialCheckpoint(family, dims, sd)


def _rename(key: str, family: str, encoder_depth: int, half: int) -> str:
    """The mdt name of an official key (relative-position keys are handled by the caller)."""
    if key == "y_embedder.embedding_table.weight":
        return "y_embedder.table.weight"
    if family == "maskdit" and key == "decoder_pos_embed":
        return "restore.pos_embed"
    if key in ("mask_token", "decoder_pos_embed") or key.startswith("decoder_layer."):
        return f"restore.{key}"
    if key.startswith("sideblocks.0."):
        return "restore.block." + key[len("sideblocks.0."):]
    match = re.match(r"^(blocks|en_inblocks|en_outblocks|de_blocks|decoder_blocks)\.(\d+)\.(.*)$", key)
    if match is None:
        return key  # x_embedder, pos_embed, t_embedder, final_layer: same names
    group, index, rest = match.group(1), int(match.group(2)), match.group(3)
    if group == "en_outblocks":
        index += half
    if group in ("de_blocks", "decoder_blocks") or (group == "blocks" and family == "mdt" and index >= encoder_depth):
        return f"decoder.{index - (encoder_depth if group == 'blocks' else 0)}.{rest}"
    return f"encoder.blocks.{index}.{rest}"


def to_mdt_state_dict(official: OfficialCheckpoint, encoder_depth: int, grid_size: int
                      ) -> dict[str, Tensor]:
    """Rename every official tensor to mdt's key; slice and check the relative-position tensors."""
    if official.family == "uvit":
        return official_uvit.to_uvit_state_dict(official.state_dict)
    half = encoder_depth // 2
    offsets = (2 * grid_size - 1) ** 2
    expected_index = RelativePositionBias(grid_size, 1).index if official.family != "dit" else None
    out = {}
    for key, value in official.state_dict.items():
        if key.endswith(_REL_INDEX):
            if not torch.equal(value.to(torch.long), expected_index):
                raise UserError(f"{key} is not the relative-position index of a {grid_size}x{grid_size} grid; "
                                "the checkpoint is not an official MDT one")
            continue
        if key.endswith(_REL_TABLE):
            if value.shape[0] < offsets:
                raise UserError(f"{key} has {value.shape[0]} rows, fewer than the {offsets} offsets of the grid")
            owner = _rename(key, official.family, encoder_depth, half)[: -len(_REL_TABLE)]  # the block
            out[f"{owner}.rel_pos.table"] = value[:offsets]
            continue
        if official.family == "maskdit" and key == "y_embedder.embedding_table.weight":
            value = value.t().contiguous()  # one-hot @ W.T == row k of W.T: an embedding table
        out[_rename(key, official.family, encoder_depth, half)] = value
    if official.family == "maskdit" and "restore.mask_token" not in out:  # trained without the MAE term
        out["restore.mask_token"] = torch.zeros(1, 1, official.dims["decoder_hidden_size"])
    return out
