"""mdt's export folder, the one format `mdt train` writes, `mdt import` writes, and `mdt sample`,
`mdt export` and `mdt train --init-from` read:

    model.safetensors + model_config.json   the model (through mdt.models.io)
    diffusion.json                          the diffusion process it was trained with
    data_manifest.json                      the latent data it was trained on, the VAE included (trained runs)
    import.json                             where an imported checkpoint came from (imports)

A training run folder holds its latest export at `RUN/ema/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mdt.diffusion.process import DiffusionConfig, diffusion_from_dict
from mdt.diffusion.schedule import ScheduleConfig, make_betas
from mdt.errors import UserError
from mdt.fileio import read_json_object, write_json
from mdt.models.io import CONFIG as MODEL_CONFIG
from mdt.models.io import WEIGHTS as MODEL_FILE
from mdt.models.io import check_format, save_pretrained

DIFFUSION_FILE = "diffusion.json"
MANIFEST_FILE = "data_manifest.json"
IMPORT_FILE = "import.json"


@dataclass(frozen=True)
class Checkpoint:
    export_dir: Path
    model_config: dict[str, Any]
    diffusion: DiffusionConfig
    manifest: dict[str, Any] | None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = int(self.model_config["input_size"])
        return (int(self.model_config["in_channels"]), size, size)

    @property
    def num_classes(self) -> int:
        return int(self.model_config["num_classes"])

    @property
    def class_names(self) -> list[str] | None:
        classes = (self.manifest or {}).get("classes")
        return [str(c) for c in classes] if isinstance(classes, list) else None


def _is_export(path: Path) -> bool:
    return (path / MODEL_FILE).is_file() and (path / MODEL_CONFIG).is_file()


def resolve_export_dir(path: str | Path) -> Path:
    """Accept a run folder (uses RUN/ema), an export folder, or the export's model.safetensors."""
    path = Path(path)
    if path.is_file() and path.name == MODEL_FILE and _is_export(path.parent):
        return path.parent
    if path.is_dir() and _is_export(path):
        return path
    if path.is_dir() and _is_export(path / "ema"):
        return path / "ema"
    raise UserError(
        f"--ckpt {path} is not a training run folder (with ema/) or an EMA export folder holding "
        f"{MODEL_FILE} and {MODEL_CONFIG}; point it at one of those."
    )


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, "re-export the checkpoint.")


def _read_diffusion(path: Path, family: str | None) -> DiffusionConfig:
    try:
        diffusion = diffusion_from_dict(_read_json(path), family=family)
        if isinstance(diffusion, ScheduleConfig):
            make_betas(diffusion)
    except (TypeError, ValueError) as err:
        raise UserError(f"{path} does not describe a diffusion process this version knows ({err}); re-export the checkpoint.") from None
    if isinstance(diffusion, ScheduleConfig) and diffusion.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise UserError(f"{path}: prediction_type {diffusion.prediction_type!r} is unknown; re-export the checkpoint.")
    return diffusion


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read the JSON records of a checkpoint (not the weights); a missing diffusion.json means DiT's defaults."""
    export = resolve_export_dir(path)
    model_config = check_format(export / MODEL_CONFIG, _read_json(export / MODEL_CONFIG))
    diffusion_path = export / DIFFUSION_FILE
    diffusion = (_read_diffusion(diffusion_path, model_config.get("family")) if diffusion_path.is_file()
                 else ScheduleConfig())
    manifest_path = export / MANIFEST_FILE
    manifest = _read_json(manifest_path) if manifest_path.is_file() else None
    learn_sigma = bool(model_config.get("learn_sigma", diffusion.learn_sigma))
    if learn_sigma != diffusion.learn_sigma:
        raise UserError(
            f"{export}: {MODEL_CONFIG} says learn_sigma={learn_sigma} but {DIFFUSION_FILE} says "
            f"{diffusion.learn_sigma}; re-export the checkpoint so they agree."
        )
    checkpoint = Checkpoint(export, model_config, diffusion, manifest)
    if manifest is not None and "latent_shape" in manifest:
        if tuple(int(v) for v in manifest["latent_shape"]) != checkpoint.latent_shape:
            raise UserError(
                f"{export}: the model takes latents {checkpoint.latent_shape} but {MANIFEST_FILE} records "
                f"{tuple(manifest['latent_shape'])}; re-export the checkpoint with its own data manifest."
            )
    return checkpoint


def write_export(directory: Path, model: torch.nn.Module, diffusion: dict[str, Any], *,
                 weights: dict[str, torch.Tensor] | None = None, data_manifest: dict[str, Any] | None = None,
                 imported_from: dict[str, Any] | None = None) -> None:
    """Write an export folder: the model (`weights` replace its own, e.g. the EMA's) and its JSON records."""
    save_pretrained(model, directory, state_dict=weights)
    write_json(directory / DIFFUSION_FILE, diffusion)
    if data_manifest is not None:
        write_json(directory / MANIFEST_FILE, data_manifest)
    if imported_from is not None:
        write_json(directory / IMPORT_FILE, imported_from)
