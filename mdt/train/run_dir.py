"""The layout of a training run folder and its checkpoints.

    RUN/config.yaml            resolved settings, written before the first step
    RUN/data_manifest.json     the manifest of the latents the run trains on
    RUN/metrics.jsonl          one JSON object per logged step or validation
    RUN/metrics.json           summary, written at the end
    RUN/ema/                   latest EMA export (what `mdt sample --ckpt RUN` reads)
    RUN/checkpoints/LATEST.json           {"tag", "step", "world_size", "zero_stage", "global_batch"} of the
                                          newest complete checkpoint
    RUN/checkpoints/step_00001000/        DeepSpeed state (exact resume) + elastic/ (the same optimizer state
                                          whole: mdt.train.elastic) + ema/ + weights/
    RUN/checkpoints/step_00001000/files.json   every file of the checkpoint and its size, written last

The ema/ and weights/ folders are export folders (mdt.checkpoints.export_folder).
A checkpoint counts only once its files.json and then LATEST.json are written, so a crash during a
save leaves the previous one in charge; a resume checks the files against files.json and falls
back to the newest checkpoint that is whole (a file truncated or lost later, e.g. by a full disk).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from mdt.checkpoints.export_folder import MANIFEST_FILE
from mdt.errors import UserError
from mdt.fileio import read_json_object, read_safetensors, write_json
from mdt.models.io import WEIGHTS

LATEST = "LATEST.json"
FILES = "files.json"


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
        return self.root / MANIFEST_FILE

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    def latest(self) -> tuple[str, int] | None:
        record = self.latest_record()
        return None if record is None else (record["tag"], int(record["step"]))

    def latest_record(self) -> dict | None:
        path = self.checkpoints / LATEST
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # unreadable: `resumable` falls back to the folders' own records

    def mark_latest(self, tag: str, step: int, layout: dict) -> None:
        """Make `tag` the checkpoint a resume starts from; `layout`: world_size, zero_stage, global_batch."""
        write_json(self.checkpoints / LATEST, {"tag": tag, "step": step, **layout})

    def record_files(self, tag: str) -> None:
        """Write tag/files.json: every file of the finished checkpoint with its size."""
        folder = self.checkpoints / tag
        files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
                 if p.is_file() and p.name != FILES}
        write_json(folder / FILES, files)

    def problem(self, tag: str) -> str | None:
        """Why checkpoint `tag` cannot be resumed from (a missing or cut file), or None if it is whole."""
        folder = self.checkpoints / tag
        try:
            files = json.loads((folder / FILES).read_text())
        except FileNotFoundError:
            return f"{folder} has no {FILES} (its save did not finish)"
        except (OSError, ValueError) as err:
            return f"{folder / FILES} is unreadable ({err})"
        for name, size in files.items():
            path = folder / name
            if not path.is_file():
                return f"{path} is missing"
            if path.stat().st_size != size:
                return f"{path} holds {path.stat().st_size} of its {size} bytes"
        return None

    def resumable(self) -> tuple[str, int, list[str]]:
        """(tag, step, what was skipped) of the newest whole checkpoint; raises naming the problem.

        Checkpoints written before files.json existed are trusted when LATEST.json names them.
        """
        record = self.latest_record()
        if record and "world_size" not in record and (self.checkpoints / record["tag"]).is_dir():
            return record["tag"], int(record["step"]), []  # written before files.json existed
        skipped = []
        for folder in sorted((p for p in self.checkpoints.glob("step_*") if p.is_dir()), reverse=True):
            problem = self.problem(folder.name)
            if problem is None:
                return folder.name, int(folder.name[5:]), skipped
            skipped.append(problem)
        if not skipped:
            raise UserError(f"--resume {self.root}: no checkpoint in {self.checkpoints}; start a new run instead")
        raise UserError(f"--resume {self.root}: no checkpoint is whole ({skipped[0]}); restore the file or start "
                        "a new run")

    def prune(self, keep_last: int) -> None:
        """Delete all but the newest `keep_last` checkpoints (the newest being the one just marked)."""
        latest = self.latest()
        if latest is None:
            return
        tags = sorted(p for p in self.checkpoints.glob("step_*") if p.is_dir() and int(p.name[5:]) <= latest[1])
        for path in tags[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)


def load_run_config(run: Path) -> dict:
    """The resolved settings a run was started with (RUN/config.yaml)."""
    path = RunDir(run).config
    if not path.is_file():
        raise UserError(f"--resume {run}: {path} does not exist; is this a run folder written by mdt train?")
    try:
        settings = yaml.safe_load(path.read_bytes())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"--resume {run}: {path} is not valid YAML ({str(err).splitlines()[0]}); restore it, or "
                        f"start a new run with --init-from {run}") from None
    if not isinstance(settings, dict):
        raise UserError(f"--resume {run}: {path} holds no settings (empty or damaged); restore it, or start a "
                        f"new run with --init-from {run}")
    return settings


def read_json(path: Path) -> dict:
    """A JSON record of a run or export folder (e.g. data_manifest.json), which must be there."""
    if not path.is_file():
        raise UserError(f"{path} does not exist; the folder is not a complete mdt run or export")
    return read_json_object(path, "re-export it or copy the folder again")


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
    return read_safetensors(path, "re-export it or copy it again")


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
