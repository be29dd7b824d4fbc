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
- Batch j of an epoch is built by worker j mod num_workers, completely (decoding, view choice,
  posterior noise), so the main process only hands batches on. The noise and the view choice come
  from a generator seeded by (seed, rank, global batch index): they depend on the batch, not on
  the worker or on where the run started.

Together: for fixed (data, seed, rank, world_size, num_workers, batch_size), starting at
`start_batch=k` yields bitwise the batches k, k+1, ... of a run started at 0. Resuming inside an
epoch re-reads (without decoding) the part of the epoch already consumed.

Only the fields training needs are read and decoded: `moments.npy` (numpy layout, no pickle)
and `cls`; WebDataset's default decoders (which unpickle) are never used. Shards are read with the
lean tar reader in `mdt.data.tar_stream` (tarfile's header parsing was the bottleneck) and
shuffled with WebDataset's buffer shuffle.
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
from mdt.data.manifest import ShardEntry, read_manifest
from mdt.data.shard_format import (
    LABEL_FIELD,
    MOMENTS_FIELD,
    MomentsDecoder,
    RawSample,
    decode_label,
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
    sample_shape: tuple[int, ...]  # of the stored moments array (V, M, C, H, W)
    scaling_factor: float
    shift_factor: float
    num_classes: int
    seed: int
    rank: int
    world_size: int
    workers: int  # logical workers, at least 1 (num_workers=0 runs one in the main process)
    batch_size: int
    batches_per_epoch: int
    shuffle_buffer: int


class _RankBatches(IterableDataset):
    """This rank's endless stream of finished batches from `start_batch` on; with DataLoader
    workers, each yields every num_workers-th batch (the DataLoader interleaves them in order).

    Global batch b is epoch b // n, batch j = b % n of that epoch (n batches per epoch), and is
    built from the sample stream of logical worker j mod W. A DataLoader worker p handles the
    batches start_batch + p + kW, which within one epoch all belong to one logical worker, so
    each worker follows one logical stream per epoch and no stream is read twice.
    """

    def __init__(self, plan: _StreamPlan, start_batch: int):
        self.plan = plan
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[Batch]:
        plan = self.plan
        info = get_worker_info()
        worker_id = info.id if info is not None else 0
        decode = MomentsDecoder(plan.sample_shape)
        stream_key: tuple[int, int] | None = None  # (epoch, logical worker) of `samples`
        samples: Iterator[RawSample] = iter(())
        next_owned = 0  # the next batch of the epoch that `samples` would fill
        batch_index = self.start_batch + worker_id
        while True:
            epoch, j = divmod(batch_index, plan.batches_per_epoch)
            logical = j % plan.workers
            if stream_key != (epoch, logical):
                stream_key, samples, next_owned = (epoch, logical), self._samples(epoch, logical), logical
            while next_owned < j:  # resuming inside an epoch: re-read, don't decode
                for _ in range(plan.batch_size):
                    next(samples)
                next_owned += plan.workers
            chunk = [next(samples) for _ in range(plan.batch_size)]
            next_owned += plan.workers
            moments, labels = _stack(chunk, decode, plan.num_classes)
            # Noise and views depend on the global batch index only, not on which worker runs.
            generator = torch.Generator().manual_seed(_seed(plan.seed, plan.rank, batch_index))
            latents = sample_latents(moments, plan.scaling_factor, plan.shift_factor, generator)
            yield {"latents": latents, "labels": labels}
            batch_index += plan.workers

    def _samples(self, epoch: int, logical: int) -> Iterator[RawSample]:
        """The shuffled samples of one logical worker in one epoch: its own shards, then resampled ones."""
        rng = random.Random(_seed(self.plan.seed, epoch, self.plan.rank, logical))
        # The worker's own shards are shuffled apart from the resampled top-up, so an epoch whose
        # quota matches the split (even shards) visits each of its samples exactly once.
        shuffle = wds.shuffle(self.plan.shuffle_buffer, self.plan.shuffle_buffer, rng=rng)
        return itertools.chain(
            shuffle(_raw_samples(self._own_shards(epoch, logical))),
            shuffle(_raw_samples(self._resampled_shards(rng))),
        )

    def _own_shards(self, epoch: int, logical: int) -> Iterator[str]:
        """This worker's slice of this rank's slice of the epoch's shard permutation."""
        plan = self.plan
        epoch_rng = random.Random(_seed(plan.seed, epoch))
        permutation = epoch_rng.sample(plan.shard_paths, len(plan.shard_paths))
        yield from permutation[plan.rank :: plan.world_size][logical :: plan.workers]

    def _resampled_shards(self, rng: random.Random) -> Iterator[str]:
        """Endless random shards: a worker never runs dry, whatever the shard counts."""
        while True:
            yield rng.choice(self.plan.shard_paths)


def _raw_samples(shard_paths: Iterator[str]) -> Iterator[RawSample]:
    """The samples of each shard in turn, with only the fields training needs read."""
    for path in shard_paths:
        yield from iter_tar_samples(path, fields=(MOMENTS_FIELD, LABEL_FIELD))


def _stack(samples: list[RawSample], decode: MomentsDecoder, num_classes: int) -> tuple[np.ndarray, torch.Tensor]:
    moments = np.stack([decode(s.fields[MOMENTS_FIELD]) for s in samples])  # (B, V, M, C, H, W)
    labels = [decode_label(s.fields[LABEL_FIELD]) for s in samples]
    # Checked here, on host integers: the model checks label values only on the CPU, since checking
    # a GPU tensor makes the host wait for the GPU in every step.
    for sample, label in zip(samples, labels, strict=True):
        if not 0 <= label < num_classes:
            raise UserError(f"sample {sample.key} has label {label}, outside the manifest's {num_classes} classes; "
                            "run `mdt data verify` on the data and re-encode the shards it names")
    return moments, torch.tensor(labels, dtype=torch.int64)


def sample_latents(
    moments: np.ndarray,
    scaling_factor: float,
    shift_factor: float,
    generator: torch.Generator,
    random_view: bool = True,
) -> torch.Tensor:
    """Scaled latents (B, C, H, W) float32 from stored float16 moments (B, V, M, C, H, W).

    Picks a view per sample at random (when `random_view` and two are stored, else the original)
    and draws z = mean + std * eps with eps from `generator`; for pixel data (mean only) z = mean.
    """
    batch, views, num_moments = moments.shape[:3]
    if random_view and views > 1:
        view = torch.randint(0, views, (batch,), generator=generator).numpy()
        chosen = moments[np.arange(batch), view]  # (B, M, C, H, W)
    else:
        chosen = moments[:, 0]
    # numpy converts float16 several times faster than torch on the CPU, and its single-threaded
    # elementwise ops do not contend with the training process's threads.
    z = chosen[:, 0].astype(np.float32)
    if num_moments > 1:
        eps = torch.randn(z.shape, generator=generator).numpy()
        z += chosen[:, 1].astype(np.float32) * eps
    if shift_factor:
        z -= np.float32(shift_factor)
    z *= np.float32(scaling_factor)
    return torch.from_numpy(z)


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
        pin_memory: hand out batches in pinned memory (for asynchronous copies to a GPU).
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
        pin_memory: bool = False,
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
        self.pin_memory = pin_memory
        self.plan = _StreamPlan(
            shard_paths=tuple(str(self.manifest.shard_path(e.name)) for e in entries),
            sample_shape=self.manifest.sample_shape,
            scaling_factor=self.manifest.scaling_factor,
            shift_factor=self.manifest.shift_factor,
            num_classes=self.manifest.num_classes,
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
        dataset = _RankBatches(self.plan, self.start_batch)
        if self.num_workers == 0:
            return iter(dataset)
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=4,
            pin_memory=self.pin_memory,
        )
        return iter(loader)


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
    decode = MomentsDecoder(manifest.sample_shape)

    def finish(pending: list[RawSample], batch_index: int) -> Batch:
        moments, labels = _stack(pending, decode, manifest.num_classes)
        generator = torch.Generator().manual_seed(_seed(seed, batch_index))
        latents = sample_latents(
            moments, manifest.scaling_factor, manifest.shift_factor, generator, random_view=False
        )
        return {"latents": latents, "labels": labels, "keys": [s.key for s in pending]}

    pending: list[RawSample] = []
    batch_index = 0
    for entry in entries:
        for sample in iter_tar_samples(manifest.shard_path(entry.name), fields=(MOMENTS_FIELD, LABEL_FIELD)):
            pending.append(sample)
            if len(pending) == batch_size:
                yield finish(pending, batch_index)
                pending, batch_index = [], batch_index + 1
    if pending:
        yield finish(pending, batch_index)
