"""Offline latent encoding: images -> VAE posterior moments in WebDataset shards + manifest.json.

The work is cut by a deterministic plan (`mdt.data.encode_plan`): the sorted inputs in shards of
`shard_size` images, shard i written by rank i mod world size. A shard is written under a temporary name, renamed when
complete, and then recorded in `.encode-state/<shard>.json`; a re-run skips recorded shards and
redoes the rest, so a run killed at any moment resumes without a partial file under a final name.
Rank 0 writes `rejects.jsonl` and then `manifest.json` once every rank has finished.

Images are decoded and cropped in DataLoader workers (uint8, 4x smaller than float); the device
only converts to [-1, 1] and runs the VAE, and the host writes batch i while the GPU encodes i+1.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import mdt
from mdt import distributed
from mdt.data.encode_plan import (
    PlannedShard,
    claim_output,
    output_settings,
    plan_shards,
    remove_stale_temporaries,
    shard_done,
    shards_of_rank,
    sidecar_path,
)
from mdt.data.images import DECODE_ERRORS, preprocess
from mdt.data.manifest import MANIFEST_NAME, Manifest, ShardEntry, manifest_from_dict
from mdt.data.shard_format import (
    MOMENTS_KL,
    MOMENTS_PIXEL,
    STORAGE_DTYPE,
    VIEWS_FLIP,
    VIEWS_PLAIN,
    TarShardWriter,
    sample_key,
)
from mdt.data.sources import InputSet, SourceImage, list_inputs
from mdt.errors import UserError
from mdt.fileio import atomic_path, write_json
from mdt.locking import exclusive_folder
from mdt.preemption import leave_stop_signals_to_the_parent, start_workers
from mdt.vae import DEFAULT_VAE, Autoencoder, load_autoencoder

REJECTS_NAME = "rejects.jsonl"
# Ranks wait for the slowest one before the manifest is written; on uneven nodes that can be hours.
RANK_WAIT_MINUTES = 24 * 60


@dataclass(frozen=True)
class EncodeConfig:
    """Settings of one `mdt encode` run: the CLI's options and a recipe's encode: keys, one to one."""

    input: str = ""  # an ImageFolder root, tar shards ('imgs-{000..009}.tar') or a file listing tars
    out: str = ""
    resolution: int = 256
    vae: str = DEFAULT_VAE
    vae_config: str | None = None
    shard_size: int = 1000
    flip: bool = False
    batch_size: int = 32
    workers: int | None = None  # None: a share of this machine's cores per local rank
    class_list: str | None = None
    device: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class EncodeSummary:
    output: str
    total: int  # samples in the dataset
    rejected: int
    shards: int
    encoded_now: int  # inputs this process handled in this run (0 when all was done already)
    seconds: float
    images_per_s: float  # of this run, summed over ranks


def default_workers() -> int:
    """DataLoader workers per rank: this machine's cores shared by its local ranks, minus the main one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, cores // local_ranks - 1))


def encode_dataset(config: EncodeConfig) -> EncodeSummary:
    """Encode `config.input` into latent shards in `config.out`; run on every rank alike.
    One encode per folder at a time (a second is refused, naming the first)."""
    _validate(config)
    distributed.init(timeout_minutes=RANK_WAIT_MINUTES)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"OUT {out}: is a file, not a folder; choose a folder for the latent shards.")
    with exclusive_folder(out, "OUT"):
        return _encode_locked(config, out)


def _encode_locked(config: EncodeConfig, out: Path) -> EncodeSummary:
    rank, world_size = distributed.get_rank(), distributed.get_world_size()

    inputs = list_inputs(config.input, config.class_list)
    device = torch.device(config.device) if config.device else distributed.default_device()
    vae = load_autoencoder(config.vae, device=device, config=config.vae_config)
    if config.resolution % vae.downsample:
        raise UserError(
            f"--resolution {config.resolution}: must be a multiple of the VAE's downsampling factor {vae.downsample}."
        )
    settings = output_settings(config, inputs, vae)
    claim_output(out, settings)
    distributed.barrier()

    plan = plan_shards(len(inputs.images), config.shard_size)
    pending = [s for s in shards_of_rank(plan, rank, world_size) if not shard_done(out, s)]
    distributed.print0(
        f"{inputs.description}: {len(inputs.images)} images, {len(inputs.classes)} classes "
        f"({inputs.classes.rule} order), {inputs.ignored_files} non-image files ignored; "
        f"{len(plan)} shards of {config.shard_size}, {len(pending)} to write on rank 0 of {world_size}"
    )
    started = time.perf_counter()
    encoded_now = _encode_shards(out, pending, inputs.images, vae, config, rank) if pending else 0
    seconds = time.perf_counter() - started
    total_now = distributed.all_reduce_sum(encoded_now)
    slowest = _max_over_ranks(seconds)

    if rank == 0:
        manifest = _finish(out, plan, inputs, vae, config, settings)
    distributed.barrier()
    if rank != 0:
        manifest = manifest_from_dict(out, json.loads((out / MANIFEST_NAME).read_text()))
    rate = total_now / slowest if slowest > 0 else 0.0
    distributed.print0(
        f"{out}: {manifest.total} samples in {len(manifest.shards)} shards, {manifest.rejected} rejected "
        f"(see {REJECTS_NAME}); this run encoded {int(total_now)} inputs in {slowest:.1f} s "
        f"= {rate:.1f} images/s over {world_size} process(es)"
    )
    return EncodeSummary(
        str(out), manifest.total, manifest.rejected, len(manifest.shards), encoded_now, seconds, rate
    )


def _max_over_ranks(value: float) -> float:
    if not distributed.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.to(distributed.default_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


def _validate(config: EncodeConfig) -> None:
    if not config.input:
        raise UserError("no input images given; pass INPUT or set input: in the recipe's encode: section")
    if not config.out:
        raise UserError("no output folder given; pass OUT or set out: in the recipe's encode: section")
    if config.resolution <= 0 or config.resolution % 8:
        raise UserError(f"--resolution {config.resolution}: use a positive multiple of 8 (e.g. 256 or 512).")
    if config.shard_size <= 0:
        raise UserError(f"--shard-size {config.shard_size}: use a positive number of images per shard.")
    if config.batch_size <= 0:
        raise UserError(f"--batch-size {config.batch_size}: use a positive batch size.")
    if config.workers is not None and config.workers < 0:
        raise UserError(f"--workers {config.workers}: use 0 (decode in the main process) or more.")


# ----------------------------------------------------------------------------- decoding (workers)


@dataclass
class _Decoded:
    index: int  # into the sorted inputs
    pixels: np.ndarray | None  # (R, R, 3) uint8, None when rejected
    source: dict[str, Any]
    reason: str | None = None


class _ImageDataset(Dataset):
    """The inputs of the pending shards, decoded and cropped on access (in DataLoader workers)."""

    def __init__(self, indices: list[int], images: Sequence[SourceImage], resolution: int):
        self.indices = indices
        self.images = images
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> _Decoded:
        index = self.indices[i]
        image = self.images[index]
        source: dict[str, Any] = {"source": image.relpath, "class": image.class_name, "label": image.label}
        try:
            data = image.read_bytes()
            if not data:
                return _Decoded(index, None, source, "empty file (0 bytes)")
            decoded = preprocess(data, self.resolution)
        except UnidentifiedImageError:
            return _Decoded(index, None, source, "not an image format PIL can read")
        except DECODE_ERRORS as err:
            return _Decoded(index, None, source, f"{type(err).__name__}: {err}")
        source.update(width=decoded.width, height=decoded.height, mode=decoded.mode)
        return _Decoded(index, decoded.pixels, source)


@dataclass
class _ImageBatch:
    items: list[_Decoded]
    pixels: torch.Tensor  # (N_valid, R, R, 3) uint8, the usable items in order


def _collate(items: list[_Decoded]) -> _ImageBatch:
    valid = [torch.from_numpy(item.pixels) for item in items if item.pixels is not None]
    pixels = torch.stack(valid) if valid else torch.empty(0, dtype=torch.uint8)
    for item in items:
        item.pixels = None  # the stacked tensor carries them; don't send them twice
    return _ImageBatch(items, pixels)


# ----------------------------------------------------------------------------- encoding (device)


@dataclass
class _Encoded:
    batch: _ImageBatch
    moments: torch.Tensor  # (N_valid, views, moments, C, h, w) float16, on the host once ready
    ready: torch.cuda.Event | None


def _launch_encode(vae: Autoencoder, batch: _ImageBatch, flip: bool) -> _Encoded:
    """Start encoding one batch; on a GPU the result arrives asynchronously (see `ready`)."""
    if batch.pixels.shape[0] == 0:
        return _Encoded(batch, torch.empty(0, dtype=torch.float16), None)
    on_gpu = vae.device.type == "cuda"
    pixels = batch.pixels.pin_memory() if on_gpu else batch.pixels
    # (N, R, R, 3) uint8 viewed as NCHW keeps the channels-last layout, which the convolutions of
    # oneDNN (CPU) and cuDNN run markedly faster than NCHW-contiguous input; keep it on purpose.
    x = pixels.to(vae.device, non_blocking=True).permute(0, 3, 1, 2)
    x = x.to(torch.float32, memory_format=torch.channels_last).div_(127.5).sub_(1.0)
    if flip:
        x = torch.cat([x, x.flip(-1)])  # (2N, 3, R, R): originals, then their mirror images
    mean, std = vae.encode_moments(x)  # (V*N, C, h, w) each
    parts = [mean] if vae.kind == "pixel" else [mean, std]
    moments = torch.stack(parts, dim=1)  # (V*N, M, C, h, w)
    views = 2 if flip else 1
    moments = moments.unflatten(0, (views, -1)).transpose(0, 1).to(torch.float16)  # (N, V, M, C, h, w)
    if not on_gpu:
        return _Encoded(batch, moments.contiguous(), None)
    host = moments.contiguous().to("cpu", non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return _Encoded(batch, host, ready)


class _ShardAssembler:
    """Routes encoded samples (arriving in input order) into their shards' tar files."""

    def __init__(self, out: Path, shards: Sequence[PlannedShard], images: Sequence[SourceImage]):
        self.out = out
        self.images = images
        self.by_start = {s.start: s for s in shards}
        self.shard: PlannedShard | None = None
        self.writer: TarShardWriter | None = None
        self.open_files = contextlib.ExitStack()  # the shard's temporary name and its handle
        self.rejects: list[dict[str, Any]] = []
        self.seen = 0

    def add(self, item: _Decoded, moments: np.ndarray | None) -> None:
        if self.shard is None:
            self._open(self.by_start[item.index])
        assert self.shard is not None and self.writer is not None
        if moments is None:
            self.rejects.append({"source": item.source["source"], "reason": item.reason})
        else:
            self.writer.write(sample_key(item.index), moments, item.source["label"], item.source)
        self.seen += 1
        if self.seen == self.shard.size:
            self._close()

    def _open(self, shard: PlannedShard) -> None:
        remove_stale_temporaries(self.out, shard)
        self.shard, self.rejects, self.seen = shard, [], 0
        temp = self.open_files.enter_context(atomic_path(self.out / shard.name))
        self.writer = TarShardWriter(self.open_files.enter_context(open(temp, "wb")))

    def _close(self) -> None:
        assert self.shard is not None and self.writer is not None
        count = self.writer.count
        self.writer.close()
        self.open_files.close()  # closes the file, then renames it onto the final name
        record = {
            "name": self.shard.name,
            "rank": distributed.get_rank(),
            "inputs": self.shard.size,
            "count": count,
            "bytes": (self.out / self.shard.name).stat().st_size,
            "rejects": self.rejects,
        }
        write_json(sidecar_path(self.out, self.shard), record)
        self.shard = self.writer = None

    def abandon(self, error: BaseException) -> None:
        """Drop a shard left open by an error: its temporary file goes, its final name stays free."""
        self.open_files.__exit__(type(error), error, error.__traceback__)
        self.shard = self.writer = None


def _encode_shards(
    out: Path,
    shards: list[PlannedShard],
    images: Sequence[SourceImage],
    vae: Autoencoder,
    config: EncodeConfig,
    rank: int,
) -> int:
    indices = [i for s in shards for i in range(s.start, s.stop)]
    workers = default_workers() if config.workers is None else config.workers
    loader = DataLoader(
        _ImageDataset(indices, images, config.resolution),
        batch_size=config.batch_size,
        num_workers=workers,
        collate_fn=_collate,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=leave_stop_signals_to_the_parent,
    )
    assembler = _ShardAssembler(out, shards, images)
    bar = tqdm(
        total=len(indices),
        unit="img",
        desc=f"encode rank {rank}",
        position=distributed.local_rank(),
        disable=not config.progress,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    in_flight: _Encoded | None = None
    try:
        for batch in start_workers(lambda: iter(loader)):
            launched = _launch_encode(vae, batch, config.flip)
            if in_flight is not None:
                _write_encoded(in_flight, assembler, bar)
            in_flight = launched
        if in_flight is not None:
            _write_encoded(in_flight, assembler, bar)
    except BaseException as error:
        assembler.abandon(error)
        raise
    finally:
        bar.close()
    return len(indices)


def _write_encoded(encoded: _Encoded, assembler: _ShardAssembler, bar: tqdm) -> None:
    if encoded.ready is not None:
        encoded.ready.synchronize()
    moments = encoded.moments.numpy()
    row = 0
    for item in encoded.batch.items:
        if item.reason is None:
            assembler.add(item, moments[row])
            row += 1
        else:
            assembler.add(item, None)
    bar.update(len(encoded.batch.items))


# ----------------------------------------------------------------------------- finishing (rank 0)


def _finish(
    out: Path,
    plan: Sequence[PlannedShard],
    inputs: InputSet,
    vae: Autoencoder,
    config: EncodeConfig,
    settings: dict[str, Any],
) -> Manifest:
    """Collect the shard records into rejects.jsonl and then manifest.json (the last file written)."""
    entries, rejects = (
        [],
        [{"source": rel, "reason": reason, "shard": None} for rel, reason in inputs.rejected],
    )
    for shard in plan:
        if not shard_done(out, shard):
            raise RuntimeError(f"{out / shard.name} is incomplete after every rank finished")
        record = json.loads(sidecar_path(out, shard).read_text())
        entries.append(ShardEntry(shard.name, int(record["count"])))
        rejects.extend({**r, "shard": shard.name} for r in record["rejects"])
    with atomic_path(out / REJECTS_NAME) as temp:
        temp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rejects))
    manifest = Manifest(
        root=out,
        resolution=config.resolution,
        latent_shape=vae.latent_shape(config.resolution),
        dtype=STORAGE_DTYPE,
        vae_spec=vae.spec,
        vae_kind=vae.kind,
        scaling_factor=vae.scaling_factor,
        shift_factor=vae.shift_factor,
        vae_config=vae.config_dir,
        flip=config.flip,
        classes=inputs.classes.names,
        shards=tuple(entries),
        total=sum(e.count for e in entries),
        rejected=len(rejects),
        mdt_version=mdt.__version__,
        views=VIEWS_FLIP if config.flip else VIEWS_PLAIN,
        moments=MOMENTS_PIXEL if vae.kind == "pixel" else MOMENTS_KL,
        settings={**settings, "input": inputs.description},
    )
    write_json(out / MANIFEST_NAME, manifest.to_dict())
    return manifest
