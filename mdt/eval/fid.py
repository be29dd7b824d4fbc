"""FID and KID of a sample set against a reference: the `mdt fid` and `mdt fid-ref` flows.

Samples are a folder of images or an ADM-style npz (`arr_0`, uint8 NHWC). The reference is a
statistics npz or an image folder; a folder is reduced with ADM's center crop to the samples'
resolution, and its statistics are cached, keyed by the folder's listing and the network.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mdt.errors import UserError
from mdt.eval.features import (
    MODE,
    FeatureNetwork,
    array_features,
    common_resolution,
    files_features,
    list_images,
    load_feature_network,
)
from mdt.eval.stats import FeatureStats, fid, kid
from mdt.fileio import merge_json

STATS_FORMAT = "mdt-fid-stats"
SAMPLE_NAME = re.compile(r"\d{6,}\.png")  # mdt.sample.images.sample_path: {i:06d}.png


@dataclass
class FeatureOptions:
    inception: Path | None = None
    device: str | None = None
    batch_size: int = 64
    num_workers: int = 4
    verbose: bool = True

    def network(self) -> FeatureNetwork:
        device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return load_feature_network(self.inception, device)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mdt" / "fid-ref"


def _check_count(found: int, num: int | None, what: str) -> int:
    if found < 2:
        raise UserError(f"{what} holds {found} image(s); FID needs at least 2 (use thousands for a meaningful number).")
    if num is not None and found < num:
        raise UserError(f"{what} holds {found} images but --num asks for {num}; sample more or lower --num.")
    return found if num is None else num


def sample_files(folder: Path) -> list[Path]:
    """The samples of a folder: `mdt sample`'s {i:06d}.png files in index order when there are any
    (never its grid.png or other images), else every image in the folder."""
    numbered = sorted((p for p in folder.glob("*.png") if SAMPLE_NAME.fullmatch(p.name)), key=lambda p: int(p.stem))
    return numbered or list_images(folder, recursive=False)


def sample_features(samples: Path, num: int | None, net: FeatureNetwork, opts: FeatureOptions) -> tuple[np.ndarray, int]:
    """Features of the first `num` samples (all when None) and their resolution."""
    if samples.is_file() and samples.suffix == ".npz":
        try:
            with np.load(samples, allow_pickle=False) as data:
                images = data["arr_0"] if "arr_0" in data else None
        except (OSError, ValueError) as err:
            raise UserError(f"--samples {samples} is not a readable npz ({err}); pass a folder or samples.npz.") from None
        if images is None or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise UserError(f"--samples {samples} has no uint8 (N, H, W, 3) arr_0; pass the samples.npz of `mdt sample`.")
        if images.shape[1] != images.shape[2]:
            raise UserError(f"--samples {samples} holds {images.shape[2]}x{images.shape[1]} images; FID here takes square ones.")
        count = _check_count(len(images), num, f"--samples {samples}")
        return array_features(images[:count], net, batch_size=opts.batch_size), int(images.shape[1])
    if not samples.is_dir():
        raise UserError(f"--samples {samples} is neither a folder of images nor an .npz file; pass one of those.")
    files = sample_files(samples)
    count = _check_count(len(files), num, f"--samples {samples}")
    width, height = common_resolution(files)
    if width != height:
        raise UserError(f"--samples {samples} holds {width}x{height} images; FID here takes square ones.")
    feats = files_features(files[:count], net, batch_size=opts.batch_size, num_workers=opts.num_workers, verbose=opts.verbose)
    return feats, width


def _stats_meta(net: FeatureNetwork, resolution: int, count: int, source: Path) -> dict[str, Any]:
    return {
        "format": STATS_FORMAT,
        "mode": MODE,
        "resolution": resolution,
        "num_images": count,
        "feature_network": net.digest,
        "source": str(source.resolve()),
    }


def reference_stats(
    images: Path, resolution: int, net: FeatureNetwork, opts: FeatureOptions, num: int | None = None
) -> FeatureStats:
    """Statistics of an image folder (recursive), each image center-cropped to `resolution` as ADM does."""
    if not images.is_dir():
        raise UserError(f"{images} is not a folder of images; pass the folder of reference images.")
    files = list_images(images, recursive=True)
    count = _check_count(len(files), num, f"the reference folder {images}")
    feats = files_features(files[:count], net, crop_to=resolution, batch_size=opts.batch_size,
                           num_workers=opts.num_workers, verbose=opts.verbose)
    return FeatureStats.from_features(feats, _stats_meta(net, resolution, count, images))


def _folder_cache_key(images: Path, resolution: int, net: FeatureNetwork) -> str:
    h = hashlib.sha256(f"{images.resolve()}|{resolution}|{net.digest}|{MODE}".encode())
    for p in list_images(images, recursive=True):
        st = p.stat()
        h.update(f"{p.relative_to(images)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def load_reference(ref: Path, resolution: int, net: FeatureNetwork, opts: FeatureOptions,
                   cache_dir: Path | None) -> FeatureStats:
    """A statistics file as is, or a folder's statistics (computed once, then read from the cache)."""
    if ref.is_file():
        stats = FeatureStats.load(ref)
        meta = stats.meta
        if meta.get("feature_network") not in (None, net.digest):
            raise UserError(f"--ref {ref} was computed with a different feature network; recompute it with `mdt fid-ref`.")
        if meta.get("resolution") not in (None, resolution):
            raise UserError(
                f"--ref {ref} describes {meta['resolution']} px images but the samples are {resolution} px; "
                f"use reference statistics made with --resolution {resolution}."
            )
        return stats
    if not ref.is_dir():
        raise UserError(f"--ref {ref} does not exist; pass a statistics .npz or a folder of reference images.")
    cache = (cache_dir or default_cache_dir()) / f"{_folder_cache_key(ref, resolution, net)}.npz"
    if cache.is_file():
        return FeatureStats.load(cache)
    stats = reference_stats(ref, resolution, net, opts)
    stats.save(cache)
    return stats


def default_metrics_path(samples: Path) -> Path:
    """metrics.json beside the samples: in the folder, or beside a samples.npz."""
    return (samples if samples.is_dir() else samples.parent) / "metrics.json"


def evaluate(
    samples: Path,
    ref: Path,
    *,
    num: int | None = None,
    out: Path | None = None,
    opts: FeatureOptions | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """FID and KID of `samples` against `ref`; returns the metrics and adds them to metrics.json beside
    the samples (or `out`)."""
    opts = opts or FeatureOptions()
    if not samples.exists():
        raise UserError(f"--samples {samples} does not exist; pass the output folder of `mdt sample` or its samples.npz.")
    if not ref.exists():
        raise UserError(f"--ref {ref} does not exist; pass a statistics .npz or a folder of reference images.")
    net = opts.network()
    feats, resolution = sample_features(samples, num, net, opts)
    ref_stats = load_reference(ref, resolution, net, opts, cache_dir)
    sample_stats = FeatureStats.from_features(feats)
    metrics: dict[str, Any] = {
        "fid": fid(sample_stats, ref_stats),
        "kid": kid(feats, ref_stats.feats) if ref_stats.feats is not None else None,
        "num_samples": len(feats),
        "num_reference": ref_stats.meta.get("num_images"),
        "resolution": resolution,
        "mode": MODE,
        "feature_network": net.digest,
        "samples": str(samples.resolve()),
        "reference": str(ref.resolve()),
    }
    # Merged, not overwritten: other commands (class accuracy) may report into the same file.
    merge_json(out or default_metrics_path(samples), {**metrics, "fid_skipped": None})
    return metrics


def make_reference(images: Path, out: Path, resolution: int, *, num: int | None = None,
                   opts: FeatureOptions | None = None) -> FeatureStats:
    """`mdt fid-ref`: statistics (with features, for KID) of a reference folder, saved to `out`."""
    opts = opts or FeatureOptions()
    if resolution < 1:
        raise UserError(f"--resolution {resolution} must be a positive number of pixels.")
    if out.suffix != ".npz":
        raise UserError(f"--out {out} must end in .npz.")
    if not images.is_dir():
        raise UserError(f"{images} is not a folder of images; pass the folder of reference images.")
    net = opts.network()
    stats = reference_stats(images, resolution, net, opts, num)
    stats.save(out)
    return stats
