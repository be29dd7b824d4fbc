"""Latent samples/s delivered by the training reader (`mdt.data.reader.LatentLoader`).

Writes a latent dataset in the exact format `mdt encode` writes (same shard writer, same manifest;
random moments instead of VAE outputs, since only the bytes' layout matters to the reader) and
measures, in this process, batches of scaled latents per second for several worker counts, next to
a straightforward WebDataset pipeline doing the same work (tarfile_to_samples, shuffle, np.load,
torch posterior sampling) as the baseline. One JSON line per figure, then the ratios.

    python tools/benchmarks/bench_loader.py --samples 8000 --latent 4x32x32 --flip --batch-size 256
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from mdt.data.manifest import MANIFEST_NAME, Manifest, ShardEntry
from mdt.data.reader import LatentLoader
from mdt.data.shard_format import MOMENTS_KL, VIEWS_FLIP, VIEWS_PLAIN, TarShardWriter, sample_key
from mdt.fileio import write_json


@dataclass(frozen=True)
class Args:
    samples: int
    shard_size: int
    latent: tuple[int, int, int]
    flip: bool
    batch_size: int
    batches: int
    workers: tuple[int, ...]


def parse_args() -> Args:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument(
        "--latent", default="4x32x32", help="C x H x W of one latent (256 px SD-VAE: 4x32x32)"
    )
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=120, help="timed batches per configuration")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    ns = parser.parse_args()
    latent = tuple(int(x) for x in ns.latent.split("x"))
    workers = tuple(int(w) for w in ns.workers.split(","))
    return Args(ns.samples, ns.shard_size, latent, ns.flip, ns.batch_size, ns.batches, workers)  # type: ignore[arg-type]


def write_dataset(root: Path, args: Args) -> Manifest:
    rng = np.random.default_rng(0)
    views = VIEWS_FLIP if args.flip else VIEWS_PLAIN
    shape = (len(views), len(MOMENTS_KL), *args.latent)
    entries = []
    for start in range(0, args.samples, args.shard_size):
        name = f"shard-{start // args.shard_size:06d}.tar"
        count = min(args.shard_size, args.samples - start)
        with open(root / name, "wb") as handle:
            writer = TarShardWriter(handle)
            for index in range(start, start + count):
                moments = rng.standard_normal(shape).astype(np.float16)
                moments[:, 1] = np.abs(moments[:, 1]) * 0.01  # std
                writer.write(sample_key(index), moments, int(rng.integers(1000)), {"source": f"{index}.JPEG"})
            writer.close()
        entries.append(ShardEntry(name, count))
    manifest = Manifest(
        root=root,
        resolution=args.latent[1] * 8,
        latent_shape=args.latent,
        dtype="float16",
        vae_spec="bench-random-moments",
        vae_kind="autoencoder-kl",
        scaling_factor=0.18215,
        shift_factor=0.0,
        flip=args.flip,
        classes=tuple(f"class{i}" for i in range(1000)),
        shards=tuple(entries),
        total=args.samples,
        rejected=0,
        mdt_version="bench",
        views=views,
        moments=MOMENTS_KL,
    )
    write_json(root / MANIFEST_NAME, manifest.to_dict())
    return manifest


def webdataset_baseline(manifest: Manifest, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """The plain way: WebDataset's tar reading, shuffle and batching; np.load; torch sampling."""

    def decode(sample: dict) -> tuple[np.ndarray, int]:
        return np.load(io.BytesIO(sample["moments.npy"]), allow_pickle=False), int(sample["cls"])

    urls = [str(manifest.shard_path(s.name)) for s in manifest.shards]
    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls, seed=0),
        wds.tarfile_to_samples(),
        wds.shuffle(1000, 1000),
        wds.map(decode),
        wds.batched(batch_size, collation_fn=None),
    )
    generator = torch.Generator().manual_seed(0)
    for batch in pipeline:
        moments = torch.from_numpy(np.stack([m for m, _ in batch])).float()
        view = torch.randint(0, moments.shape[1], (len(batch),), generator=generator)
        chosen = moments[torch.arange(len(batch)), view]
        eps = torch.randn(chosen[:, 0].shape, generator=generator)
        latents = (chosen[:, 0] + chosen[:, 1] * eps) * manifest.scaling_factor
        yield {"latents": latents, "labels": torch.tensor([label for _, label in batch])}


def measure(batches: Iterator[dict[str, torch.Tensor]], count: int) -> tuple[float, int]:
    """(seconds, samples) for `count` batches after one warm-up batch (worker start, buffer fill)."""
    next(batches)
    start = time.perf_counter()
    samples = sum(int(b["labels"].shape[0]) for b in itertools.islice(batches, count))
    return time.perf_counter() - start, samples


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        manifest = write_dataset(Path(tmp), args)
        common = {"bench": "loader", "latent": list(args.latent), "flip": args.flip,
                  "batch_size": args.batch_size, "samples_in_dataset": args.samples,
                  "batches_per_epoch": args.samples // args.batch_size}  # fmt: skip
        rates: dict[str, float] = {}
        seconds, samples = measure(webdataset_baseline(manifest, args.batch_size), args.batches)
        rates["webdataset-baseline(workers=0)"] = samples / seconds
        print(json.dumps({**common, "config": "webdataset-baseline", "workers": 0,
                          "samples_per_s": round(samples / seconds, 1)}))  # fmt: skip
        for workers in args.workers:
            start = time.perf_counter()
            loader = LatentLoader(Path(tmp), args.batch_size, seed=0, num_workers=workers)
            index_s = time.perf_counter() - start  # the sample index: tar headers only
            seconds, samples = measure(iter(loader), args.batches)
            rates[f"mdt-reader(workers={workers})"] = samples / seconds
            print(json.dumps({**common, "config": "mdt-reader", "workers": workers, "index_s": round(index_s, 3),
                              "samples_per_s": round(samples / seconds, 1)}))  # fmt: skip
        baseline = rates["webdataset-baseline(workers=0)"]
        for name, rate in rates.items():
            if name.startswith("mdt-reader"):
                print(json.dumps({**common, "ratio": f"{name}/webdataset-baseline(workers=0)",
                                  "speedup": round(rate / baseline, 3)}))  # fmt: skip


if __name__ == "__main__":
    main()
