"""The layout of a training run folder and its checkpoints.

    RUN/config.yaml            resolved settings, written before the first step
    RUN/data_manifest.json     the manifest of the latents the run trains on
    RUN/metrics.jsonl          one JSON object per logged step or validation
    RUN/metrics.json           summary, written at the end
    RUN/ema/                   latest EMA export (what `mdt sample --ckpt RUN` reads)
    RUN/checkpoints/LATEST.json           {"tag", "step"} of the newest complete checkpoint
    RUN/checkpoints/step_00001000/        DeepSpeed state (exact resume) + ema/ + weights/

An export folder holds model.safetensors + model_config.json (rebuild the model alone),
diffusion.json (the noise schedule) and data_manifest.json (the VAE to decode with).
A checkpoint counts only once LATEST.json names it, so a crash during a save leaves the previous
one in charge.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from mdt.errors import UserError
from mdt.fileio import write_json
from mdt.models import save_pretrained
from mdt.models.io import WEIGHTS

LATEST = "LATEST.json"
DIFFUSION = "diffusion.json"
DATA_MANIFEST = "data_manifest.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def ema(self) -> Path:
        return self.root / "ema"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def data_manifest(self) -> Path:
        return self.root / DATA_MANIFEST

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    def latest(self) -> tuple[str, int] | None:
        path = self.checkpoints / LATEST
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        return record["tag"], int(record["step"])

    def mark_latest(self, tag: str, step: int) -> None:
        write_json(self.checkpoints / LATEST, {"tag": tag, "step": step})

    def prune(self, keep_last: int) -> None:
        """Delete checkpoints older than the newest `keep_last` complete ones, and stale partial ones."""
        latest = self.latest()
        if latest is None:
            return
        latest_step = latest[1]
        tags = sorted(p for p in self.checkpoints.glob("step_*") if p.is_dir())
        complete = [p for p in tags if int(p.name[5:]) <= latest_step]
        for path in complete[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)


def write_export(directory: Path, model: torch.nn.Module, weights: dict[str, torch.Tensor],
                 diffusion: dict, data_manifest: dict) -> None:
    save_pretrained(model, directory, state_dict=weights)
    write_json(directory / DIFFUSION, diffusion)
    write_json(directory / DATA_MANIFEST, data_manifest)


def replace_folder(source: Path, destination: Path) -> None:
    """Make `destination` a copy of `source`, swapping it in whole."""
    staging = destination.with_name(f".{destination.name}.new")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    old = destination.with_name(f".{destination.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if destination.exists():
        destination.rename(old)
    staging.rename(destination)
    shutil.rmtree(old, ignore_errors=True)


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS
    if not path.is_file():
        raise UserError(f"{path} does not exist; --init-from takes a run folder, a checkpoint folder or an export")
    return load_file(str(path))


def resolve_init_source(path: str | Path) -> tuple[Path, Path]:
    """(weights folder, EMA folder) for --init-from: a run, one of its checkpoints, or an export."""
    path = Path(path)
    if (path / "checkpoints" / LATEST).is_file():
        tag, _ = RunDir(path).latest()
        path = path / "checkpoints" / tag
    if (path / "weights").is_dir() and (path / "ema").is_dir():
        return path / "weights", path / "ema"
    if (path / WEIGHTS).is_file():
        return path, path
    raise UserError(f"--init-from {path}: expected a training run folder, a checkpoint folder with weights/ and "
                    "ema/, or an export folder with model.safetensors")
