"""`manifest.json`: what a latent dataset holds and how it was made.

The encode stage writes it last, after every shard is complete; every later stage reads it through
`read_manifest` and refuses a mismatch (latent shape, VAE) instead of guessing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mdt.errors import UserError

MANIFEST_NAME = "manifest.json"
FORMAT = "mdt-latents"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardEntry:
    name: str
    count: int


@dataclass(frozen=True)
class Manifest:
    """The parsed manifest of the latent dataset in `root`."""

    root: Path
    resolution: int
    latent_shape: tuple[int, int, int]  # (C, H, W) of one latent
    dtype: str
    vae_spec: str
    vae_kind: str
    scaling_factor: float
    shift_factor: float
    flip: bool
    classes: tuple[str, ...]
    shards: tuple[ShardEntry, ...]
    total: int
    rejected: int
    mdt_version: str
    views: tuple[str, ...]  # per-sample views stored: ("original",) or ("original", "hflip")
    moments: tuple[str, ...]  # ("mean", "std"), or ("mean",) for pixel
    vae_config: str | None = None
    settings: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of the stored `moments.npy` array of one sample."""
        return (len(self.views), len(self.moments), *self.latent_shape)

    def shard_path(self, name: str) -> Path:
        return self.root / name

    def select_shards(self, names: list[str] | tuple[str, ...] | None = None) -> tuple[ShardEntry, ...]:
        """The entries named in `names` (all when None); UserError for a name not in the manifest."""
        if names is None:
            return self.shards
        by_name = {s.name: s for s in self.shards}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise UserError(
                f"shard '{unknown[0]}' is not in {self.root / MANIFEST_NAME}; pass names listed there."
            )
        return tuple(by_name[n] for n in names)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "resolution": self.resolution,
            "latent_shape": list(self.latent_shape),
            "dtype": self.dtype,
            "vae": {
                "spec": self.vae_spec,
                "kind": self.vae_kind,
                "scaling_factor": self.scaling_factor,
                "shift_factor": self.shift_factor,
                "config": self.vae_config,
            },
            "flip": self.flip,
            "views": list(self.views),
            "moments": list(self.moments),
            "classes": list(self.classes),
            "num_classes": self.num_classes,
            "shards": [{"name": s.name, "count": s.count} for s in self.shards],
            "total": self.total,
            "rejected": self.rejected,
            "mdt_version": self.mdt_version,
            "settings": self.settings,
        }


def manifest_from_dict(root: str | Path, data: dict[str, Any]) -> Manifest:
    """Parse a manifest dictionary; KeyError/TypeError/ValueError when a key is missing or wrong."""
    if data.get("format") != FORMAT:
        raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
    if int(data["format_version"]) > FORMAT_VERSION:
        raise ValueError(f"format_version {data['format_version']} is newer than this mdt reads")
    vae = data["vae"]
    shape = tuple(int(x) for x in data["latent_shape"])
    if len(shape) != 3:
        raise ValueError("latent_shape must be [C, H, W]")
    return Manifest(
        root=Path(root),
        resolution=int(data["resolution"]),
        latent_shape=shape,
        dtype=str(data["dtype"]),
        vae_spec=str(vae["spec"]),
        vae_kind=str(vae["kind"]),
        scaling_factor=float(vae["scaling_factor"]),
        shift_factor=float(vae.get("shift_factor", 0.0)),
        vae_config=vae.get("config"),
        flip=bool(data["flip"]),
        classes=tuple(str(c) for c in data["classes"]),
        shards=tuple(ShardEntry(str(s["name"]), int(s["count"])) for s in data["shards"]),
        total=int(data["total"]),
        rejected=int(data["rejected"]),
        mdt_version=str(data["mdt_version"]),
        views=tuple(data.get("views", ["original", "hflip"] if data["flip"] else ["original"])),
        moments=tuple(data.get("moments", ["mean", "std"])),
        settings=dict(data.get("settings", {})),
    )


def read_manifest(data_dir: str | Path) -> Manifest:
    """Read `data_dir/manifest.json`; UserError naming the path if it is missing or invalid."""
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise UserError(
            f"{path} does not exist; encode the images first with `mdt encode IMAGES {data_dir}` "
            "(or let an interrupted encode finish)."
        )
    try:
        return manifest_from_dict(Path(data_dir), json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise UserError(
            f"{path} is not a valid latent manifest ({err}); re-run `mdt encode` into a new folder."
        ) from err
