"""Optimizer state that does not depend on the world size: a preempted run resumes on any number of
ranks, or another ZeRO stage, with nothing lost.

DeepSpeed's own checkpoint (one optimizer partition per rank) loads only into the layout that wrote
it; its universal-checkpoint converter knows Adam's two moments but not Adan's four. So each
checkpoint also holds the optimizer state per parameter, whole, as if trained on one rank:

    step_X/elastic/<state key>.safetensors   e.g. exp_avg, exp_avg_sq (AdamW); Adan adds exp_avg_diff,
                                             neg_pre_grad: {parameter name: fp32 tensor}
    step_X/elastic/state.json                the step, training seconds, the global batch, the
                                             world size and ZeRO stage that wrote it, and the
                                             optimizer's scalars (step counts, lr schedule, loss scale)

The fp32 master weights are the checkpoint's weights/ export and the EMA its ema/ export (both whole
already). A resume on the world size and ZeRO stage that wrote the checkpoint loads DeepSpeed's
partitions (faster); any other resume loads these files: every value is copied exactly, so the run
goes on as it would have, up to the order in which gradients are summed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from mdt import distributed
from mdt.fileio import atomic_path, read_json_object, read_safetensors, write_json
from mdt.train.engine import Engine

ELASTIC_DIR = "elastic"
STATE_FILE = "state.json"
UNREADABLE_FIX = "resume with the world size and ZeRO stage that wrote the checkpoint, or restore the file"


def save_elastic_state(engine: Engine, folder: Path, record: dict[str, Any]) -> None:
    """Collective: gather the optimizer state whole; rank 0 writes it with `record` (step, ...) into `folder`."""
    tensors, rest = engine.full_optimizer_state()
    if not distributed.is_main():
        return
    for key, full in tensors.items():
        with atomic_path(folder / f"{key}.safetensors") as tmp:
            save_file({name: t.contiguous() for name, t in full.items()}, str(tmp), metadata={"format": "pt"})
    write_json(folder / STATE_FILE, {**record, "state_keys": sorted(tensors), "optimizer": rest})


def read_elastic_record(folder: Path) -> dict[str, Any] | None:
    """The checkpoint's elastic record (state.json), or None for a checkpoint written without one."""
    path = folder / STATE_FILE
    return read_json_object(path, UNREADABLE_FIX) if path.is_file() else None


def load_elastic_state(engine: Engine, folder: Path, record: dict[str, Any], global_batch: int) -> None:
    """Every rank reads the whole state and keeps its partition (weights: see mdt.train.loop)."""
    tensors = {key: read_safetensors(folder / f"{key}.safetensors", UNREADABLE_FIX) for key in record["state_keys"]}
    engine.load_full_optimizer_state(tensors, record["optimizer"], int(record["step"]), global_batch)


def world_layout_changed(record: dict[str, Any], world: int, zero_stage: int) -> bool:
    """Whether a checkpoint recorded as `record` (LATEST.json) was written by another world size or stage."""
    return record.get("world_size", world) != world or record.get("zero_stage", zero_stage) != zero_stage

