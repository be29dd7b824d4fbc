"""`mdt import`: an official or diffusers checkpoint -> an mdt export folder.

The export (`model.safetensors`, `model_config.json`, `diffusion.json`, `import.json`) is what
`load_pretrained`, `mdt sample --ckpt` and `mdt train --init-from` read. `diffusion.json` is the
process the source code base trained with (MaskDiT: EDM; the others DDPM; `import_diffusion`), so
`mdt sample` picks the right samplers. It records no data manifest: the VAE the model was trained
with is named at sampling (`--vae`).

Files are read without unpickling arbitrary objects: `torch.load(weights_only=True)` with only
`argparse.Namespace` allowed (DiT's `train.py` stores its arguments as one), unless the user
passes `trust_pickle` for a file they trust.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
from pathlib import Path
from pickle import UnpicklingError  # the error of a refused weights_only load
from typing import Any

import torch
from torch import Tensor

from mdt.checkpoints.export_folder import write_export
from mdt.checkpoints.import_diffusion import diffusers_schedule, imported_diffusion
from mdt.checkpoints.official import read_official, to_mdt_state_dict
from mdt.errors import UserError
from mdt.fileio import read_json_object, read_safetensors
from mdt.models.config import ModelConfig
from mdt.models.registry import FAMILY_NAMES, model_config
from mdt.models.registry import build_model as build_family_model
from mdt.models.transformer import DiffusionTransformer
from mdt.settings import parse_value

# Fields a preset fixes that the tensors also determine: a contradiction is refused.
_SHAPE_FIELDS = ("hidden_size", "depth", "patch_size", "num_heads", "decoder_depth", "decoder_hidden_size", "mlp_ratio")


def load_checkpoint_file(path: Path, trust_pickle: bool = False) -> dict[str, Any]:
    """The object in a .pt/.pth/.bin (safe unpickling) or .safetensors file."""
    if path.suffix == ".safetensors":
        return read_safetensors(path, "download it again")
    try:
        if trust_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except UnpicklingError as err:
        refused = _REFUSED_GLOBAL.search(str(err))
        if refused:  # a readable file that names a class: only the user's trust can get past that
            raise UserError(f"{path} needs full unpickling, which can run arbitrary code (it names "
                            f"{refused.group(1)}); pass --trust-pickle only if you trust where the file came "
                            "from") from None
        raise _not_a_checkpoint(path) from None
    except Exception:  # torch.load on foreign bytes fails in many ways (IndexError, EOFError, RuntimeError, ...)
        raise _not_a_checkpoint(path) from None


# How torch's weights_only unpickler refuses a class it will not build; garbage fails otherwise.
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def _not_a_checkpoint(path: Path) -> UserError:
    return UserError(f"{path} is not a readable PyTorch checkpoint (truncated or another format); mdt import reads "
                     "torch.save files (.pt, .pth, .bin), .safetensors files and diffusers DiT folders, so download "
                     "it again or pass one of those")


def select_state_dict(obj: Any, source: Path) -> tuple[dict[str, Tensor], str]:
    """A raw state_dict, or the EMA weights of a DiT/ADM-style training checkpoint dict."""
    if not isinstance(obj, dict):
        raise UserError(f"{source} holds a {type(obj).__name__}, not a state_dict or a checkpoint dict")
    for key in ("ema", "model", "state_dict"):
        if isinstance(obj.get(key), dict) and all(isinstance(v, Tensor) for v in obj[key].values()):
            return obj[key], f"the '{key}' entry"
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise UserError(f"{source} holds no tensors (keys {sorted(obj)[:8]}); it is not a model checkpoint")
    return tensors, "a raw state_dict"


def read_diffusers_folder(folder: Path) -> tuple[dict, dict[str, Tensor]]:
    """(mdt config fields, mdt state_dict) of a DiTTransformer2DModel folder or a pipeline's transformer/."""
    from mdt.models.diffusers_dit import config_from_diffusers, state_dict_from_diffusers

    root = folder / "transformer" if (folder / "transformer" / "config.json").is_file() else folder
    config_path = root / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder} is a folder without config.json or transformer/config.json; pass a diffusers "
                        "DiT folder (DiTTransformer2DModel or DiTPipeline) or a checkpoint file")
    config = read_json_object(config_path, "download the model again")
    index = root / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():  # sharded weights
        weight_map = read_json_object(index, "download the model again").get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index} has no weight_map of tensor names to files; download the model again")
        shards = sorted(set(map(str, weight_map.values())))
        files = [root / name for name in shards]
    else:
        files = [p for p in (root / "diffusion_pytorch_model.safetensors", root / "diffusion_pytorch_model.bin")
                 if p.is_file()][:1]
    if not files:
        raise UserError(f"{root} holds no diffusion_pytorch_model.safetensors (or .bin); the download is incomplete")
    tensors: dict[str, Tensor] = {}
    for path in files:
        if not path.is_file():
            raise UserError(f"{path} is listed in {index.name} but missing; the download is incomplete")
        tensors.update(load_checkpoint_file(path))
    return config_from_diffusers(config), state_dict_from_diffusers(tensors, config)


def _parse_sets(sets: list[str]) -> dict[str, Any]:
    known = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    out = {}
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep or key not in known:
            raise UserError(f"--set {item!r}: expected key=value with a model option ({', '.join(sorted(known))})")
        out[key] = parse_value(key, text)  # YAML, as every command's --set
    return out


def resolve_config(model: str, dims: dict, family: str, sets: list[str], *, input_size: int | None = None,
                   num_classes: int | None = None) -> ModelConfig:
    """Sizes from the tensors, the rest from `model` (a preset such as DiT-XL/2, or a family name
    such as DiT) and `--set`; refuse any contradiction, naming both sides."""
    overrides = _parse_sets(sets)
    for name, given in (("input_size", input_size), ("num_classes", num_classes)):
        if given is not None and given != dims[name]:
            raise UserError(f"--{name.replace('_', '-')} {given} contradicts the checkpoint, which holds {dims[name]}")
    preset_family = FAMILY_NAMES.get(model.split("-")[0])
    if preset_family is None:
        raise UserError(f"--model {model!r} is not a model family or preset; use e.g. DiT-XL/2, MDT-XL/2 or MDTv2")
    if preset_family != family:
        raise UserError(f"the checkpoint is an official {family} model but --model {model} is {preset_family}; "
                        "pass a --model of the checkpoint's family")
    preset = model if "/" in model else f"{model}-S/2"  # a family alone: every size from the tensors
    fields = model_config(preset).to_dict()
    for key in _SHAPE_FIELDS:
        if key in dims and key not in overrides and "/" in model and fields[key] != dims[key]:
            raise UserError(f"--model {model} has {key}={fields[key]} but the checkpoint has {dims[key]}; "
                            f"pass the matching preset or --set {key}={dims[key]}")
    for key, value in overrides.items():
        if key in dims and value != dims[key]:
            raise UserError(f"--set {key}={value} contradicts the checkpoint, which holds {key}={dims[key]}")
    if "/" not in model and "num_heads" not in dims and "num_heads" not in overrides:
        raise UserError(f"the checkpoint does not say how many attention heads it has; pass --set num_heads=N "
                        f"or a preset such as {model}-XL/2")
    fields.update(dims)
    fields.update(overrides)
    sized_as_preset = "/" in model and not set(overrides) & set(_SHAPE_FIELDS)
    fields["name"] = model if sized_as_preset else (
        f"{model.split('-')[0]}-{fields['depth']}x{fields['hidden_size']}/{fields['patch_size']}")
    try:
        return ModelConfig.from_dict(fields)
    except ValueError as err:
        raise UserError(f"the imported model is not valid: {err}") from None


def build_model(config: ModelConfig, state_dict: dict[str, Tensor], source: Path) -> DiffusionTransformer:
    model = build_family_model(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    if missing or extra:
        raise UserError(f"{source} does not fit {config.name}: missing {missing[:4]}, unexpected {extra[:4]}; "
                        "the checkpoint is incomplete or was made with other settings")
    for key, value in state_dict.items():
        if value.shape != expected[key].shape:
            raise UserError(f"{source}: {key} has shape {tuple(value.shape)} but {config.name} needs "
                            f"{tuple(expected[key].shape)}; check --model and --set")
    model.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return model.eval()


def import_checkpoint(source: Path, out: Path, *, model: str, sets: list[str] = (), input_size: int | None = None,
                      num_classes: int | None = None, trust_pickle: bool = False) -> ModelConfig:
    """Read `source`, write the export folder `out` (whole or not at all); returns the model config."""
    source = Path(source)
    out = Path(out)
    if not source.exists():
        raise UserError(f"{source} does not exist; pass an official checkpoint file or a diffusers DiT folder")
    if out.exists():
        raise UserError(f"{out} already exists; pass a new folder for the import")
    checks = dict(input_size=input_size, num_classes=num_classes)
    if source.is_dir():
        dims, state_dict = read_diffusers_folder(source)
        config = resolve_config(model, dims, "dit", list(sets), **checks)
        fmt, what = "diffusers", "a diffusers DiTTransformer2DModel"
        diffusion = imported_diffusion("dit", config.learn_sigma, diffusers_schedule(source))
    else:
        tensors, what = select_state_dict(load_checkpoint_file(source, trust_pickle), source)
        official = read_official(tensors)
        if official is None:
            raise UserError(f"{source} ({what}) is not an official DiT, MDT, MDTv2, MaskDiT or MaskDM checkpoint: its "
                            f"keys start {sorted(tensors)[:6]}; mdt import reads those and diffusers DiT folders")
        config = resolve_config(model, official.dims, official.family, list(sets), **checks)
        # The official layout maps onto mdt's once the encoder depth (MDTv1: from --set) is known.
        state_dict = to_mdt_state_dict(official, config.encoder_depth, config.grid_size)
        fmt = f"official {official.family}"
        diffusion = imported_diffusion(official.family, config.learn_sigma, official.schedule)
    network = build_model(config, state_dict, source)
    staging = out.with_name(f".{out.name}.importing")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write_export(staging, network, diffusion.to_dict(),
                     imported_from={"source": str(source.resolve()), "format": fmt, "read": what,
                                    "vae": "not recorded: pass --vae to mdt sample"})
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return config
