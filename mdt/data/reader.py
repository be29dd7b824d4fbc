"""The training reader: endless, shuffled, exactly resumable batches of scaled latents.

`LatentLoader` yields micro-batches `{"latents": float32 (B, C, H, W), "labels": int64 (B,), "sample_ids":
int64 (B,)}` forever, where
latents = (mean + std * eps - shift) * scaling_factor is a fresh posterior sample, from a random
choice of the stored views (original or its horizontal flip) when both were encoded.

How the stream is laid out, and why (one stream for the whole run, whatever the number of ranks):
- At start the reader indexes its shards: where each sample's moments lie in which tar (headers
  only, data seeked over) and its label. Samples are then read by position, like the official
  code's map-style datasets, so an epoch can be any order of them.
- Epoch e is one permutation of all N samples, seeded by (seed, e), cut into global batches of
  `global_batch` samples (N // global_batch of them; the N mod global_batch left over sit out that
  epoch). Global batch s is optimizer step s. Rank r of W takes the r-th of W equal slices of it
  and cuts its slice into micro-batches (grad_accum = global_batch / (micro_batch x W)). Micro-batch
  k of the global batch (k = r x grad_accum + a) is thus the same samples on 1, 2 or 64 ranks.
- Each sample's posterior noise and view choice come from a generator seeded by (seed, step,
  position in the global batch), never by rank: the same run on any number of ranks sees the same
  samples with the same noise at every step. So micro-batch q is a function of q alone: not of
  the DataLoader workers (worker p builds the micro-batches p, p + W, ...), nor of where the run
  started. Starting at `start_step=k` yields bitwise what a run from 0 yields from step k on.
- A read that fails (an NFS hiccup, a shard truncated under the reader) is retried a few times,
  then named in one sentence; a label outside the classes or a non-finite latent stops the run
  naming the sample. DataLoader workers drop SIGTERM/SIGINT from anyone but their parent: the
  trainer owns the signal and shuts them down (mdt.preemption).

Only `moments.npy` and `cls` are read and decoded (numpy layout, no pickle); WebDataset's default
decoders (which unpickle) are never used.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mdt import distributed
from mdt.data.manifest import ShardEntry, read_manifest
from mdt.data.sample_index import SampleIndex, ShardReader, build_index
from mdt.data.shard_format import (
    LABEL_FIELD,
    MOMENTS_FIELD,
    MomentsDecoder,
    RawSample,
    decode_label,
    iter_tar_samples,
)
from mdt.errors import UserError
from mdt.preemption import leave_stop_signals_to_the_parent, start_workers

Batch = dict[str, torch.Tensor]

# Independent random streams of the reader (spawn keys, as mdt.sample.seeding does).
_EPOCH_ORDER = 0
_SAMPLE_NOISE = 1
_VALIDATION_NOISE = 2


def _seed(seed: int, stream: int, *key: int) -> int:
    """A well-mixed 63-bit seed for one stream and key; distinct streams never coincide."""
    sequence = np.random.SeedSequence(entropy=int(seed), spawn_key=(stream, *(int(k) for k in key)))
    state = sequence.generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@dataclass(frozen=True)
class _StreamPlan:
    """Everything a worker needs to rebuild any micro-batch of the stream (no open files)."""

    index: SampleIndex
    sample_shape: tuple[int, ...]  # of the stored moments array (V, M, C, H, W)
    scaling_factor: float
    shift_factor: float
    seed: int
    rank: int
    global_batch: int  # samples per optimizer step, over all ranks
    micro_batch: int  # samples per forward pass on one rank
    grad_accum: int  # micro-batches per rank per step: global_batch / (micro_batch x world_size)
    steps_per_epoch: int
    workers: int  # DataLoader workers, at least 1 (num_workers=0 builds every batch in this process)
    read_attempts: int
    retry_wait_s: float

    def micro_batch_samples(self, order: np.ndarray, step: int, micro: int) -> tuple[np.ndarray, int]:
        """The sample numbers of this rank's micro-batch `micro` of `step` (given the epoch's `order`),
        and the position of its first sample in the global batch."""
        first = (self.rank * self.grad_accum + micro) * self.micro_batch
        start = (step % self.steps_per_epoch) * self.global_batch + first
        return order[start : start + self.micro_batch], first


class _RankBatches(IterableDataset):
    """This rank's endless stream of micro-batches from step `start_step` on; with DataLoader workers,
    worker p yields the micro-batches q0 + p + kW, q = step x grad_accum + micro (the DataLoader
    interleaves them)."""

    def __init__(self, plan: _StreamPlan, start_step: int):
        self.plan = plan
        self.start_step = start_step

    def __iter__(self) -> Iterator[Batch]:
        plan = self.plan
        info = get_worker_info()
        worker_id = info.id if info is not None else 0
        reader = ShardReader(plan.index, plan.read_attempts, plan.retry_wait_s)
        decode = MomentsDecoder(plan.sample_shape)
        order_epoch, order = -1, np.empty(0, dtype=np.int64)
        position = self.start_step * plan.grad_accum + worker_id
        try:
            while True:
                step, micro = divmod(position, plan.grad_accum)
                epoch = step // plan.steps_per_epoch
                if epoch != order_epoch:
                    order_epoch, order = epoch, epoch_order(plan, epoch)
                samples, first = plan.micro_batch_samples(order, step, micro)
                yield self._batch(reader, decode, samples, step, first)
                position += plan.workers
        finally:
            reader.close()

    def _batch(self, reader: ShardReader, decode: MomentsDecoder, samples: np.ndarray, step: int,
               first: int) -> Batch:
        plan, index = self.plan, self.plan.index
        moments = np.empty((len(samples), *plan.sample_shape), dtype=np.float16)
        # Read in file order (kind to disks and page caches), place in batch order.
        for slot in np.lexsort((index.offset[samples], index.shard[samples])):
            sample = samples[slot]
            data = reader.read(int(index.shard[sample]), int(index.offset[sample]), int(index.size[sample]))
            moments[slot] = decode(data)
        finite = np.isfinite(moments.reshape(len(samples), -1)).all(axis=1)
        if not finite.all():
            sample = samples[int(np.argmin(finite))]
            raise UserError(f"sample {reader.sample_key(sample)} in {index.shard_paths[index.shard[sample]]} holds "
                            "non-finite latents (NaN or inf); re-encode that shard (`mdt data verify` names "
                            "every bad sample)")
        generators = [torch.Generator().manual_seed(_seed(plan.seed, _SAMPLE_NOISE, step, first + i))
                      for i in range(len(samples))]
        latents = sample_latents(moments, plan.scaling_factor, plan.shift_factor, generators)
        return {"latents": latents, "labels": torch.from_numpy(index.label[samples].copy()),
                "sample_ids": torch.from_numpy(samples.astype(np.int64))}


def epoch_order(plan: _StreamPlan, epoch: int) -> np.ndarray:
    """The order of all samples in `epoch` (global batches are consecutive slices of it)."""
    return np.random.default_rng(_seed(plan.seed, _EPOCH_ORDER, epoch)).permutation(len(plan.index))


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
    generators: torch.Generator | Sequence[torch.Generator],
    random_view: bool = True,
) -> torch.Tensor:
    """Scaled latents (B, C, H, W) float32 from stored float16 moments (B, V, M, C, H, W).

    Picks a view per sample at random (when `random_view` and two are stored, else the original)
    and draws z = mean + std * eps; for pixel data (mean only) z = mean. `generators` is one per
    sample (its view, then its eps: a sample's draws do not depend on its batch) or one for the batch.
    """
    batch, views, num_moments = moments.shape[:3]
    per_sample = not isinstance(generators, torch.Generator)

    def draw(fn, *shape: int) -> np.ndarray:
        if per_sample:
            return np.stack([fn(*shape, generator=g).numpy() for g in generators])
        return fn(batch, *shape, generator=generators).numpy()

    if random_view and views > 1:
        view = draw(lambda *shape, generator: torch.randint(0, views, shape, generator=generator)).reshape(batch)
        chosen = moments[np.arange(batch), view]  # (B, M, C, H, W)
    else:
        chosen = moments[:, 0]
    # numpy converts float16 several times faster than torch on the CPU, and its single-threaded
    # elementwise ops do not contend with the training process's threads.
    z = chosen[:, 0].astype(np.float32)
    if num_moments > 1:
        z += chosen[:, 1].astype(np.float32) * draw(torch.randn, *z.shape[1:])
    if shift_factor:
        z -= np.float32(shift_factor)
    z *= np.float32(scaling_factor)
    return torch.from_numpy(z)


class LatentLoader:
    """Endless training micro-batches `{"latents": float32 (B, C, H, W), "labels": int64 (B,),
    "sample_ids": int64 (B,)}`: each step's global batch cut into this rank's micro-batches, in order.

    Args:
        data_dir: a folder written by `mdt encode`.
        micro_batch: samples per micro-batch (per rank and forward pass).
        seed: the run's seed; with the global batch it fixes the stream (not the world size).
        global_batch: samples per optimizer step over all ranks, a multiple of micro_batch x
            world_size; default micro_batch x world_size (no accumulation).
        rank, world_size: default to the process group's (or 0 and 1).
        num_workers: DataLoader workers reading and decoding (0: in this process); any number
            gives the same batches.
        start_step: the optimizer step to start at (for exact resume, on any world size).
        shards: names of the manifest's shards to read (e.g. a training split); default all.
        pin_memory: hand out batches in pinned memory (for asynchronous copies to a GPU).
        read_attempts, retry_wait_s: a failed read is tried this often, waiting 1x, 2x, 4x ...
    """

    def __init__(
        self,
        data_dir: str | Path,
        micro_batch: int,
        *,
        seed: int,
        global_batch: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 2,
        start_step: int = 0,
        shards: Sequence[str] | None = None,
        pin_memory: bool = False,
        read_attempts: int = 4,
        retry_wait_s: float = 1.0,
    ):
        self.manifest = read_manifest(data_dir)
        entries = [e for e in self.manifest.select_shards(shards) if e.count > 0]
        if not entries:
            raise UserError(f"{data_dir}: the selected shards hold no samples; pass shards with data.")
        self.rank = distributed.get_rank() if rank is None else rank
        self.world_size = distributed.get_world_size() if world_size is None else world_size
        if micro_batch <= 0 or num_workers < 0 or start_step < 0 or read_attempts < 1:
            raise ValueError("micro_batch and read_attempts must be positive, num_workers and start_step >= 0")
        self.global_batch = micro_batch * self.world_size if global_batch is None else global_batch
        if self.global_batch <= 0 or self.global_batch % (micro_batch * self.world_size):
            raise ValueError(f"global_batch {self.global_batch} is not a multiple of micro_batch {micro_batch} x "
                             f"{self.world_size} ranks")
        total = sum(e.count for e in entries)
        self.steps_per_epoch = total // self.global_batch
        if self.steps_per_epoch == 0:
            raise UserError(f"{data_dir}: its {total} samples do not fill one global batch of {self.global_batch}; "
                            "lower global_batch (or micro_batch x grad_accum x processes) or encode more data.")
        self.micro_batch = micro_batch
        self.num_workers = num_workers
        self.start_step = start_step
        self.pin_memory = pin_memory
        paths = [str(self.manifest.shard_path(e.name)) for e in entries]
        index = build_index(paths, [e.count for e in entries], self.manifest.num_classes,
                            attempts=read_attempts, wait_s=retry_wait_s)
        self.plan = _StreamPlan(
            index=index,
            sample_shape=self.manifest.sample_shape,
            scaling_factor=self.manifest.scaling_factor,
            shift_factor=self.manifest.shift_factor,
            seed=seed,
            rank=self.rank,
            global_batch=self.global_batch,
            micro_batch=micro_batch,
            grad_accum=self.global_batch // (micro_batch * self.world_size),
            steps_per_epoch=self.steps_per_epoch,
            workers=max(1, num_workers),
            read_attempts=read_attempts,
            retry_wait_s=retry_wait_s,
        )

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.manifest.latent_shape

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def grad_accum(self) -> int:
        return self.plan.grad_accum

    def __iter__(self) -> Iterator[Batch]:
        dataset = _RankBatches(self.plan, self.start_step)
        if self.num_workers == 0:
            return iter(dataset)
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=4,
            pin_memory=self.pin_memory,
            worker_init_fn=leave_stop_signals_to_the_parent,
        )
        # A worker must not die of a signal meant for the trainer: the trainer would see a crash.
        return _relay_worker_errors(start_workers(lambda: iter(loader)))


def _relay_worker_errors(batches: Iterator[Batch]) -> Iterator[Batch]:
    """A UserError raised in a worker arrives wrapped in its traceback text; pass on its sentence."""
    try:
        yield from batches
    except UserError as err:
        text = str(err)
        marker = "UserError: "
        raise UserError(text[text.rindex(marker) + len(marker) :].strip() if marker in text else text) from None


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
        generator = torch.Generator().manual_seed(_seed(seed, _VALIDATION_NOISE, batch_index))
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
