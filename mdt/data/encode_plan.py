"""The plan and resume state of `mdt encode`: which shards exist, which rank writes each, and what a
re-run into the same folder must agree on.

Shard i holds the sorted inputs [i * shard_size, (i + 1) * shard_size) and belongs to rank i mod
world size. A finished shard is recorded in `.encode-state/<shard>.json` (its bytes and input
count); the run's settings in `.encode-state/settings.json`, and later in the manifest.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mdt import distributed
from mdt.data.manifest import MANIFEST_NAME
from mdt.errors import UserError
from mdt.fileio import write_json
from mdt.locking import LOCK_NAME

if TYPE_CHECKING:
    from mdt.data.encode import EncodeConfig
    from mdt.data.sources import InputSet
    from mdt.vae import Autoencoder

STATE_DIR = ".encode-state"
SETTINGS_NAME = "settings.json"


@dataclass(frozen=True)
class PlannedShard:
    index: int
    name: str
    start: int  # [start, stop) into the sorted inputs
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def plan_shards(num_images: int, shard_size: int) -> list[PlannedShard]:
    """The sorted inputs cut into consecutive shards of `shard_size` (the last may be smaller)."""
    return [
        PlannedShard(i, shard_name(i), start, min(start + shard_size, num_images))
        for i, start in enumerate(range(0, num_images, shard_size))
    ]


def shards_of_rank(plan: Sequence[PlannedShard], rank: int, world_size: int) -> list[PlannedShard]:
    """Shard i belongs to rank i mod world size."""
    return [s for s in plan if s.index % world_size == rank]


def output_settings(config: EncodeConfig, inputs: InputSet, vae: Autoencoder) -> dict[str, Any]:
    """What decides the bytes of the output; a re-run into the same folder must match all of it."""
    return {
        "resolution": config.resolution,
        "vae": vae.spec,
        "flip": config.flip,
        "shard_size": config.shard_size,
        "class_rule": inputs.classes.rule,
        "classes": list(inputs.classes.names),
        "input_count": len(inputs.images),
        "input_fingerprint": inputs.fingerprint(),
    }


def describe_differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    differences = []
    for key in now:
        if before.get(key) == now[key]:
            continue
        if key == "classes":
            differences.append("the class list differs")
        elif key == "input_fingerprint":
            if before.get("input_count") == now.get("input_count"):
                differences.append("the input files or their labels differ")
        else:
            differences.append(f"{key} was {before.get(key)!r}, now {now[key]!r}")
    return differences


def claim_output(out: Path, settings: dict[str, Any]) -> None:
    """Check a re-run matches the recorded settings; record them on a first run (rank 0)."""
    settings_path = out / STATE_DIR / SETTINGS_NAME
    manifest_path = out / MANIFEST_NAME
    recorded: dict[str, Any] | None = None
    try:
        if settings_path.is_file():
            recorded = json.loads(settings_path.read_text())
        elif manifest_path.is_file():
            recorded = json.loads(manifest_path.read_text()).get("settings")
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(
            f"OUT {out}: its encode record is unreadable ({err}); encode into a new folder."
        ) from err
    if recorded is None and out.is_dir() and any(p.name not in (STATE_DIR, LOCK_NAME) for p in out.iterdir()):
        raise UserError(
            f"OUT {out}: the folder is not empty and was not written by `mdt encode`; choose a new folder."
        )
    if recorded is not None:
        differences = describe_differences(recorded, settings)
        if differences:
            raise UserError(
                f"OUT {out} holds an encode with other settings ({'; '.join(differences)}); "
                "encode into a new folder or repeat the earlier settings to resume."
            )
        return
    if distributed.is_main():
        write_json(settings_path, settings)


def sidecar_path(out: Path, shard: PlannedShard) -> Path:
    return out / STATE_DIR / f"{Path(shard.name).stem}.json"


def shard_done(out: Path, shard: PlannedShard) -> bool:
    sidecar, tar = sidecar_path(out, shard), out / shard.name
    if not (sidecar.is_file() and tar.is_file()):
        return False
    record = json.loads(sidecar.read_text())
    return record.get("bytes") == tar.stat().st_size and record.get("inputs") == shard.size


def remove_stale_temporaries(out: Path, shard: PlannedShard) -> None:
    """Temporary files a killed run left for this shard (only this rank writes it)."""
    for stale in out.glob(f".{shard.name}.*.tmp"):
        stale.unlink(missing_ok=True)
