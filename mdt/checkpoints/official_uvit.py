"""MaskDM's official checkpoints (jiachenlei/maskdm), read into mdt's U-ViT.

A released checkpoint (`pretrain_celebahq_m90block4_20.pt`, ...) is the dict `train_step.py` saves:
"model" is the state_dict of its GaussianDiffusion (the MaskedUViT under `model.`, beside the
schedule's buffers `betas`, `alphas_cumprod`, ...), "ema" that of an ema_pytorch EMA around it
(`ema_model.` the averaged copy, `online_model.` the live one, `initted`, `step`). The averaged
weights are read (as the official eval.py does); the schedule buffers name the beta schedule,
which is checked against mdt's, and are otherwise dropped. Key renames only, plus the label table:
the official `label_emb` rows with `uncond_embed` appended, so the null label `num_classes` is the
official unconditional embedding.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from mdt.checkpoints.import_diffusion import schedule_of_betas
from mdt.errors import UserError

_SCHEDULE_BUFFERS = {
    "betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
    "posterior_mean_coef2", "loss_weight", "p2_loss_weight",
}
_MARKERS = ("encoder.patch_embed.proj.weight", "encoder_to_output.weight")


def is_maskdm(keys: set[str]) -> bool:
    return any(key.endswith(_MARKERS[0]) for key in keys) and any(key.endswith(_MARKERS[1]) for key in keys)


def unwrap(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(MaskedUViT weights, schedule buffers) of a GaussianDiffusion or EMA state_dict."""
    if any(key.startswith("ema_model.") for key in state_dict):  # an EMA: its averaged copy
        state_dict = {k[len("ema_model."):]: v for k, v in state_dict.items() if k.startswith("ema_model.")}
    weights, buffers = {}, {}
    for key, value in state_dict.items():
        if key.startswith("model."):
            weights[key[len("model."):]] = value
        elif key in _SCHEDULE_BUFFERS:
            buffers[key] = value
        else:
            weights[key] = value  # a bare MaskedUViT state_dict
    return weights, buffers


def _count(keys: set[str], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    if found != set(range(len(found))):
        raise UserError(f"the MaskDM checkpoint's {prefix} are numbered {sorted(found)}, not 0..N-1; it is incomplete")
    return len(found)


def read_dims(sd: dict[str, Tensor]) -> dict:
    """The ModelConfig fields the tensors of an official MaskedUViT determine."""
    keys = set(sd)
    if "encoder.in_blocks.0.attn.q_bias" in keys:
        raise UserError("the MaskDM checkpoint was trained with qkv_bias=True; mdt's U-ViT has the released "
                        "models' qkv without bias")
    if "encoder.time_embed.0.weight" in keys:
        raise UserError("the MaskDM checkpoint has a time MLP (mlp_time_embed=True); mdt's U-ViT has the released "
                        "models' time token without one")
    try:
        width, channels, patch, _ = sd["encoder.patch_embed.proj.weight"].shape
        tokens = sd["encoder.encoder_pos_embed"].shape[1]
        hidden = sd["encoder.in_blocks.0.mlp.fc1.weight"].shape[0] if "encoder.in_blocks.0.mlp.fc1.weight" in keys \
            else sd["encoder.mid_block.mlp.fc1.weight"].shape[0]
    except KeyError as err:
        raise UserError(f"the MaskDM checkpoint has no tensor {err.args[0]}; it is incomplete") from None
    num_classes = sd["encoder.label_emb.weight"].shape[0] if "encoder.label_emb.weight" in keys else 0
    if num_classes and "encoder.uncond_embed" not in keys:
        raise UserError("the MaskDM checkpoint has label_emb but no uncond_embed; it is incomplete")
    grid = math.isqrt(tokens - (2 if num_classes else 1))
    if grid * grid != tokens - (2 if num_classes else 1):
        raise UserError(f"encoder_pos_embed holds {tokens} positions, not a square grid plus the extra tokens")
    half, outer = _count(keys, "encoder.in_blocks"), _count(keys, "encoder.out_blocks")
    if half != outer:
        raise UserError(f"the MaskDM checkpoint has {half} in_blocks but {outer} out_blocks; they must pair up")
    return dict(hidden_size=width, in_channels=channels, patch_size=patch, input_size=grid * patch,
                num_classes=num_classes, depth=2 * half + 1, mlp_ratio=hidden / width, learn_sigma=False)


def rename(key: str) -> str:
    """The mdt name of an official MaskedUViT key (the label table is joined by the caller)."""
    if key == "encoder_to_output.weight" or key == "encoder_to_output.bias":
        return "final_layer." + key.rsplit(".", 1)[1]
    if key == "encoder.encoder_pos_embed":
        return "pos_embed"
    if key.startswith("encoder.patch_embed."):
        return "x_embedder." + key[len("encoder.patch_embed."):]
    return key[len("encoder."):] if key.startswith("encoder.") else key


def to_uvit_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in sd.items():
        if key in ("encoder.label_emb.weight", "encoder.uncond_embed"):
            continue
        out[rename(key)] = value
    if "encoder.label_emb.weight" in sd:
        out["y_embedder.table.weight"] = torch.cat([sd["encoder.label_emb.weight"], sd["encoder.uncond_embed"]])
    return out


def schedule_from_buffers(buffers: dict[str, Tensor]) -> dict:
    """The ScheduleConfig fields of the official betas: none when none are stored (then MaskDM's cosine)."""
    if "betas" not in buffers:
        return {}
    return schedule_of_betas(buffers["betas"].double().numpy(), "the MaskDM checkpoint")
