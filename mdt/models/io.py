"""Save and load a model as safetensors weights + a JSON config that rebuilds it alone."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from mdt.errors import UserError
from mdt.fileio import atomic_path, read_json_object, read_safetensors, write_json
from mdt.models.config import ModelConfig
from mdt.models.transformer import DiffusionTransformer

WEIGHTS = "model.safetensors"
CONFIG = "model_config.json"
# Version 2: official-compatible models (DiT position embedding, MDTv2 decoder skips, trained MDT
# position embeddings). Version 1 exports carry no number and hold a different model.
FORMAT_VERSION = 2
FORMAT_KEY = "mdt_format"


def check_format(path: Path, data: dict) -> dict:
    """`data` (a model_config.json) without its version number; refuse an export of another version."""
    version = data.get(FORMAT_KEY)
    if version != FORMAT_VERSION:
        made_by = "an earlier mdt" if version is None else f"mdt export format {version}"
        raise UserError(f"{path} was made by {made_by}, whose models differ from the official architectures "
                        f"this version builds (format {FORMAT_VERSION}); retrain it, or re-import the official "
                        "checkpoint with `mdt import`")
    return {k: v for k, v in data.items() if k != FORMAT_KEY}


def save_pretrained(model: DiffusionTransformer, directory: str | Path,
                    state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `model.safetensors` and `model_config.json` into `directory` (each atomically).

    `state_dict` replaces the model's own weights (the trainer passes its EMA weights).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Fixed tables (DiT's position embedding) are buffers: the model's own values fill in for them.
    tensors = {**model.state_dict(), **(state_dict or {})}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(directory / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json(directory / CONFIG, {FORMAT_KEY: FORMAT_VERSION, **model.config.to_dict()})
    return directory


def read_model_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise UserError(f"{path} does not exist; point to a folder written by `mdt train` (its ema/ folder) "
                        "or by mdt.models.save_pretrained")
    data = read_json_object(path, "re-export the model")
    try:
        return ModelConfig.from_dict(check_format(path, data))
    except (ValueError, TypeError) as err:
        raise UserError(f"{path} is not a valid model config ({err}); re-export the model") from err


def load_pretrained(directory: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> DiffusionTransformer:
    """Rebuild the model from `model_config.json` and load `model.safetensors`; eval mode."""
    directory = Path(directory)
    config = read_model_config(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise UserError(f"{weights} does not exist; the folder has a model config but no weights")
    from mdt.models.registry import build_model  # the family's class (the U-ViT, or the transformer)

    model = build_model(config)
    state_dict = read_safetensors(weights, "re-export it or copy it again")
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise UserError(f"{weights} does not match {directory / CONFIG}: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}; the weights come from a different model")
    return model.to(device=device, dtype=dtype).eval()
