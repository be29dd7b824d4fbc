"""The training reader: endless, shuffled, exactly resumable batches of scaled latents.

`LatentLoader` yields `{"latents": float32 (B, C, H, W), "labels": int64 (B,)}` forever, where
latents = (mean + std * eps - shift) * scaling_factor is a fresh posterior sample, from a random
choice of the stored views (original or its horizontal flip) when both were encoded.

How the stream is laid out, and why:
- Epochs of a fixed `samples_per_epoch` per rank (default: total // world_size), i.e. a fixed
  number of batches, so no rank ever waits on another with fewer batches.
- In epoch e every rank takes its slice of one shared shard permutation (seeded by (seed, e)),
  and every DataLoader worker its slice of that; a worker whose shards run out before its quota
  continues with shards drawn at random (resampled), so uneven shards never stall a rank.
  Each worker shuffles through a buffer with its own generator, seeded by (seed, e, rank, worker).
- Batch j of an epoch is built by worker j mod num_workers. The posterior noise and the view
  choice are drawn in the main process from a generator seeded by (seed, rank, global batch), so
  they do not depend on which worker built the batch.

Together: for fixed (data, seed, rank, world_size, num_workers, batch_size), starting at
`start_batch=k` yields bitwise the batches k, k+1, ... of a run started at 0. Resuming inside an
epoch re-reads (without decoding) the part of the epoch already consumed.

Only the fields this package writes are decoded: `moments.npy` (numpy, allow_pickle=False) and
`cls`; never WebDataset's default decoders, which would unpickle.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mdt import distributed
from mdt.data.manifest import Manifest, ShardEntry, read_manifest
from mdt.data.shard_format import (
    LABEL_FIELD,
    MOMENTS_FIELD,
    decode_label,
    decode_moments,
    iter_tar_samples,
)
from mdt.errors import UserError

Batch = dict[str, torch.Tensor]


def _seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from several integers (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@dataclass(frozen=True)
class _StreamPlan:
    """Everything a worker needs to rebuild its part of the stream (picklable, no open files)."""

    shard_paths: tuple[str, ...]
    seed: int
    rank: int
    world_size: int
    workers: int  # logical workers, at least 1 (num_workers=0 runs one in the main process)
    batch_size: int
    batches_per_epoch: int
    shuffle_buffer: int


class _EpochBatches(IterableDataset):
    """Raw batches (stored moments + labels) of one epoch of one rank, from `first_batch` on."""

    def __init__(self, plan: _StreamPlan, epoch: int, first_batch: int):
        self.plan = plan
        self.epoch = epoch
        self.first_batch = first_batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        plan = self.plan
        info = get_worker_info()
        worker_id = info.id if info is not None else 0
        # The DataLoader asks worker 0 first; make it the owner of batch `first_batch`.
        logical = (worker_id + self.first_batch) % plan.workers
        owned = range(logical, plan.batches_per_epoch, plan.workers)
        skipped = sum(1 for j in owned if j < self.first_batch)
        produced = len(owned) - skipped
        if produced <= 0:
            return
        rng = random.Random(_seed(plan.seed, self.epoch, plan.rank, logical))
        # The worker's own shards are shuffled apart from the resampled top-up, so an epoch whose
        # quota matches the split (even shards) visits each of its samples exactly once.
        shuffle = wds.shuffle(plan.shuffle_buffer, plan.shuffle_buffer, rng=rng)
        samples = itertools.chain(
            shuffle(self._raw_samples(self._own_shards(logical))),
            shuffle(self._raw_samples(self._resampled_shards(rng))),
        )
        for _ in range(skipped * plan.batch_size):
            next(samples)  # consumed before the resume point: read, not decoded
        for _ in range(produced):
            yield _collate_raw([next(samples) for _ in range(plan.batch_size)])

    def _own_shards(self, logical: int) -> Iterator[dict[str, str]]:
        """This worker's slice of this rank's slice of the epoch's shard permutation."""
        plan = self.plan
        epoch_rng = random.Random(_seed(plan.seed, self.epoch))
        permutation = epoch_rng.sample(plan.shard_paths, len(plan.shard_paths))
        for path in permutation[plan.rank :: plan.world_size][logical :: plan.workers]:
            yield {"url": path}

    def _resampled_shards(self, rng: random.Random) -> Iterator[dict[str, str]]:
        """Endless random shards: a worker never runs dry, whatever the shard counts."""
        while True:
            yield {"url": rng.choice(self.plan.shard_paths)}

    @staticmethod
    def _raw_samples(shards: Iterator[dict[str, str]]) -> Iterator[dict]:
        fields = (MOMENTS_FIELD, "." + LABEL_FIELD)
        return iter(wds.tarfile_samples(shards, select_files=lambda name: name.endswith(fields)))


def _collate_raw(samples: list[dict]) -> dict[str, torch.Tensor]:
    moments = np.stack([decode_moments(s[MOMENTS_FIELD]) for s in samples])  # (B, V, M, C, H, W)
    labels = np.array([decode_label(s[LABEL_FIELD]) for s in samples], dtype=np.int64)
    return {"moments": torch.from_numpy(moments), "labels": torch.from_numpy(labels)}


def sample_latents(
    moments: torch.Tensor, manifest: Manifest, generator: torch.Generator, random_view: bool = True
) -> torch.Tensor:
    """Scaled latents (B, C, H, W) float32 from stored moments (B, V, M, C, H, W).

    Picks a view per sample at random (when `random_view` and two are stored, else the original)
    and draws z = mean + std * eps; for pixel data (mean only) z = mean.
    """
    moments = moments.float()
    batch = moments.shape[0]
    if random_view and moments.shape[1] > 1:
        view = torch.randint(0, moments.shape[1], (batch,), generator=generator)
        chosen = moments[torch.arange(batch), view]  # (B, M, C, H, W)
    else:
        chosen = moments[:, 0]
    z = chosen[:, 0]
    if chosen.shape[1] > 1:
        eps = torch.randn(z.shape, generator=generator)
        z = z + chosen[:, 1] * eps
    return (z - manifest.shift_factor) * manifest.scaling_factor


class LatentLoader:
    """Endless training batches `{"latents": float32 (B, C, H, W), "labels": int64 (B,)}`.

    Args:
        data_dir: a folder written by `mdt encode`.
        batch_size: samples per batch (per rank).
        seed: the run's seed; with rank, world size, workers and batch size it fixes the stream.
        rank, world_size: default to the process group's (or 0 and 1).
        num_workers: DataLoader workers reading and decoding shards (0: in this process).
        shuffle_buffer: samples each worker shuffles over.
        samples_per_epoch: per rank; default total // world_size. Rounded down to whole batches.
        start_batch: the global batch index to start at (for exact resume).
        shards: names of the manifest's shards to read (e.g. a training split); default all.
    """

    def __init__(
        self,
        data_dir: str | Path,
        batch_size: int,
        *,
        seed: int,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int | None = None,
        start_batch: int = 0,
        shards: Sequence[str] | None = None,
    ):
        self.manifest = read_manifest(data_dir)
        entries = [e for e in self.manifest.select_shards(shards) if e.count > 0]
        if not entries:
            raise UserError(f"{data_dir}: the selected shards hold no samples; pass shards with data.")
        self.rank = distributed.get_rank() if rank is None else rank
        self.world_size = distributed.get_world_size() if world_size is None else world_size
        if batch_size <= 0 or num_workers < 0 or shuffle_buffer <= 0 or start_batch < 0:
            raise ValueError(
                "batch_size and shuffle_buffer must be positive, num_workers and start_batch >= 0"
            )
        total = sum(e.count for e in entries)
        self.samples_per_epoch = total // self.world_size if samples_per_epoch is None else samples_per_epoch
        self.batches_per_epoch = self.samples_per_epoch // batch_size
        if self.batches_per_epoch == 0:
            raise UserError(
                f"{data_dir}: {self.samples_per_epoch} samples per rank per epoch do not fill one batch of "
                f"{batch_size}; lower the batch size or use fewer ranks."
            )
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.start_batch = start_batch
        self.plan = _StreamPlan(
            shard_paths=tuple(str(self.manifest.shard_path(e.name)) for e in entries),
            seed=seed,
            rank=self.rank,
            world_size=self.world_size,
            workers=max(1, num_workers),
            batch_size=batch_size,
            batches_per_epoch=self.batches_per_epoch,
            shuffle_buffer=shuffle_buffer,
        )

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.manifest.latent_shape

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    def __iter__(self) -> Iterator[Batch]:
        batch_index = self.start_batch
        while True:
            epoch, first = divmod(batch_index, self.batches_per_epoch)
            for raw in self._epoch_loader(epoch, first):
                generator = torch.Generator().manual_seed(_seed(self.plan.seed, self.rank, batch_index))
                latents = sample_latents(raw["moments"], self.manifest, generator)
                yield {"latents": latents, "labels": raw["labels"]}
                batch_index += 1

    def _epoch_loader(self, epoch: int, first_batch: int) -> Iterator[dict[str, torch.Tensor]]:
        dataset = _EpochBatches(self.plan, epoch, first_batch)
        if self.num_workers == 0:
            return iter(dataset)
        return iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers, prefetch_factor=4))


def iter_validation_batches(
    data_dir: str | Path,
    batch_size: int,
    seed: int = 0,
    *,
    shards: Sequence[str] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Batch]:
    """Deterministic, finite validation batches: the same latents every call for the same seed.

    Reads `shards` (default all) in manifest order and their samples in stored order, no shuffle,
    the original view only, and posterior noise from a generator seeded by (seed, batch index).
    With world_size > 1, rank r reads shards r, r + world_size, ... The last batch may be smaller.
    Yields `{"latents": float32 (B, C, H, W), "labels": int64 (B,), "keys": list[str]}`.
    """
    manifest = read_manifest(data_dir)
    entries: Sequence[ShardEntry] = manifest.select_shards(shards)[rank::world_size]
    pending: list[tuple[str, dict[str, bytes]]] = []
    batch_index = 0

    def emit() -> Batch:
        raw = _collate_raw([fields for _, fields in pending])
        generator = torch.Generator().manual_seed(_seed(seed, batch_index))
        latents = sample_latents(raw["moments"], manifest, generator, random_view=False)
        return {"latents": latents, "labels": raw["labels"], "keys": [key for key, _ in pending]}

    for entry in entries:
        for sample in iter_tar_samples(manifest.shard_path(entry.name)):
            pending.append((sample.key, sample.fields))
            if len(pending) == batch_size:
                yield emit()
                pending, batch_index = [], batch_index + 1
    if pending:
        yield emit()
