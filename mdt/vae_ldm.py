"""LDM-format autoencoder state dicts saved with torch (`.pth`, `.pt`, `.ckpt`), such as MaskDiT's
`autoencoder_kl.pth`, loaded into diffusers' `AutoencoderKL`.

Such a file holds only weights, in the CompVis/LDM key layout (`encoder.down.0.block.0...`, optionally
under "state_dict" and a "first_stage_model." prefix). diffusers' own single-file helper converts the
keys; the architecture comes from a diffusers `config.json` (a `--vae-config` folder, or one beside the
file) or, with neither, from `SD_KL_F8_CONFIG`: the one MaskDiT's autoencoder.py hard-codes.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from mdt.errors import UserError

TORCH_SUFFIXES = (".pth", ".pt", ".ckpt")

# MaskDiT's get_model ddconfig (ch 128, ch_mult 1,2,4,4, 2 res blocks, z 4 = embed_dim, scale 0.18215)
# in diffusers' terms; a test checks it against the official code. It is also the SD VAE's config.
SD_KL_F8_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 256,
    "scaling_factor": 0.18215,
}
_FIX = "pass MaskDiT's autoencoder_kl.pth or another LDM-format AutoencoderKL state dict"


def load_ldm_file(
    path: Path, config: str | os.PathLike[str] | None, dtype: torch.dtype
) -> tuple[torch.nn.Module, str | None]:
    """(frozen-to-be AutoencoderKL in `dtype`, resolved config folder or None for the built-in one)."""
    config_dir = _config_dir(path, config)
    from diffusers import AutoencoderKL

    architecture = AutoencoderKL.load_config(str(config_dir)) if config_dir else SD_KL_F8_CONFIG
    where = f"the config in {config_dir}" if config_dir else "the built-in SD kl-f8 architecture"
    module = AutoencoderKL.from_config(architecture)
    converted = _convert(path, read_state_dict(path), module.config)
    mismatch = _mismatch(converted, module.state_dict())
    if mismatch:
        raise UserError(
            f"--vae {path}: its weights do not fit {where} ({mismatch}); {_FIX}, "
            "with --vae-config DIR holding the diffusers config.json of its architecture if it is not SD's."
        )
    module.load_state_dict(converted, strict=True)
    # nn.Module.type, not diffusers' .to(dtype), which warns about fp32 modules this model lacks.
    return module.type(dtype), str(config_dir.resolve()) if config_dir else None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a torch-saved state dict (or of its "state_dict" entry), read without pickle code."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):  # torch's words for a class it will not build
            raise UserError(f"--vae {path}: it holds pickled Python objects, whose code mdt does not run; {_FIX}.") from None
        raise UserError(f"--vae {path}: not a torch file, truncated or of another format; {_FIX}.") from None
    except Exception as err:  # torch raises many kinds on a file that is not its format at all
        raise UserError(
            f"--vae {path}: not a torch file that loads with weights_only=True ({first_line(err)}); {_FIX}."
        ) from err
    while isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]  # LDM training checkpoints nest the weights here
    tensors = (
        {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if isinstance(loaded, dict)
        else {}
    )
    if not tensors:
        raise UserError(f"--vae {path}: holds a {type(loaded).__name__}, not a state dict of tensors; {_FIX}.")
    return tensors


def _config_dir(path: Path, config: str | os.PathLike[str] | None) -> Path | None:
    if config is None:
        return path.parent if (path.parent / "config.json").is_file() else None
    folder = Path(config).expanduser()
    if not (folder / "config.json").is_file():
        raise UserError(
            f"--vae-config {folder}: no config.json there; pass the folder holding the diffusers "
            "config.json of this autoencoder, or leave --vae-config out for the SD kl-f8 architecture."
        )
    return folder


def _convert(path: Path, state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    try:
        converted = convert_ldm_vae_checkpoint(state, config)
    except (KeyError, IndexError, AttributeError, TypeError) as err:
        raise UserError(f"--vae {path}: its keys are not an LDM AutoencoderKL's ({first_line(err)}); {_FIX}.") from err
    # The helper maps absent keys to None; leave them out so they are reported as missing.
    return {k: v for k, v in converted.items() if v is not None}


def _mismatch(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str:
    """A short account of missing, unexpected and mis-shaped keys; empty when they all fit."""
    parts = []
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshaped = [k for k in expected if k in found and found[k].shape != expected[k].shape]
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            parts.append(f"{len(keys)} {what} keys, e.g. {keys[0]}")
    if misshaped:
        key = misshaped[0]
        shapes = f"{tuple(found[key].shape)} in the file, {tuple(expected[key].shape)} expected"
        parts.append(f"{len(misshaped)} mis-shaped tensors, e.g. {key}: {shapes}")
    return "; ".join(parts)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, for a one-sentence error."""
    text = str(err).strip().splitlines()
    # torch's messages run on ("... internal miniz error. If you are seeing this error, ..."): the first sentence.
    return text[0].split(". ")[0] if text else type(err).__name__
