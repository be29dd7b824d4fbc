"""Reference statistics for `mdt fid --ref`, of three kinds, each checked against the run:

- an `mdt fid-ref` statistics file: its recorded mode, resolution and feature network must be the
  run's (and its format version this code's; format 1, which had no `version` and was always
  clean mode, is still read in clean mode when its network id matches);
- an ADM reference batch (`VIRTUAL_imagenet256_labeled.npz` and the like: `arr_0` images,
  `mu`/`sigma`, `mu_s`/`sigma_s`, no record of a mode): its statistics are adm-mode ones (they come
  from ADM's evaluator), used as they are in `adm` mode, where its images give the features for
  precision, recall and KID; in the other modes everything is computed from its images in that
  mode, and a batch without images is refused. Its images must have the samples' resolution, and
  the network must be Inception-v3;
- a folder of images (searched recursively; a folder of `mdt sample` gives its {i:06d}.png samples, as
  for --samples), ADM-center-cropped to the samples' resolution.

Features computed from images (folders, ADM batches) are cached, keyed by the source (listing,
sizes, modification times), resolution, mode, network and the versions of this code and of the
libraries that decode and resize, so a change of preprocessing never reuses a stale entry.
A file with only `mu`/`sigma` (clean-fid's own statistics) records none of that, so it is used
only when asked (`--trust-ref`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL

from mdt import distributed
from mdt.errors import UserError
from mdt.eval.features import FileImages, NpzImages, extract_features, folder_images
from mdt.eval.network import FeatureNetwork, legacy_network_id
from mdt.eval.stats import FeatureStats
from mdt.fileio import check_npz

STATS_FORMAT = "mdt-fid-stats"
STATS_VERSION = 2  # 2: a mode (clean/adm, later pytorch-fid), sFID statistics, sha1 network ids
# The libraries each mode's preprocessing depends on besides PIL and numpy (part of the cache key).
MODE_LIBRARIES = {"clean": ("clean-fid",), "adm": ("clean-fid",), "pytorch-fid": ("torch",)}


@dataclass
class EvalOptions:
    mode: str = "clean"
    batch_size: int = 64
    num_workers: int = 4
    verbose: bool = True


@dataclass
class Reference:
    stats: FeatureStats
    kind: str  # mdt-fid-stats | adm-reference-batch | image-folder | mu-sigma (unchecked)
    checked: bool = True


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mdt" / "fid-ref"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def code_versions(mode: str) -> str:
    """What the cached features of `mode` depend on besides their inputs."""
    libraries = "".join(f"|{name} {_version(name)}" for name in MODE_LIBRARIES[mode])
    return f"stats{STATS_VERSION}|mdt {_version('mdt')}{libraries}|pillow {PIL.__version__}|numpy {np.__version__}"


def stats_meta(net: FeatureNetwork, opts: EvalOptions, resolution: int, count: int, source: Path) -> dict[str, Any]:
    return {"format": STATS_FORMAT, "version": STATS_VERSION, "mode": opts.mode, "resolution": resolution,
            "num_images": count, "feature_network": net.sha1, "source": str(source.resolve()),
            "code": code_versions(opts.mode)}


def count_check(found: int, num: int | None, what: str) -> int:
    if found < 2:
        raise UserError(f"{what} holds {found} image(s); FID needs at least 2 (use thousands for a meaningful number).")
    if num is not None and found < num:
        raise UserError(f"{what} holds {found} images but --num asks for {num}; sample more or lower --num.")
    return found if num is None else num


def image_stats(source: FileImages | NpzImages, net: FeatureNetwork, opts: EvalOptions, meta: dict[str, Any],
                desc: str) -> FeatureStats:
    feats = extract_features(source, net, opts.mode, batch_size=opts.batch_size, num_workers=opts.num_workers,
                             verbose=opts.verbose, desc=desc)
    return FeatureStats.from_features(feats.pool, meta, feats.spatial)


def _cached(key_parts: list[str], cache_dir: Path | None, compute) -> FeatureStats:
    """compute() once per key; later runs (and the other ranks) read the cached file."""
    key = hashlib.sha256("\n".join(key_parts).encode()).hexdigest()[:24]
    path = (cache_dir or default_cache_dir()) / f"{key}.npz"
    everyone_has_it = distributed.all_reduce_sum(int(path.is_file())) == distributed.get_world_size()
    if everyone_has_it:
        return FeatureStats.load(path, what="the cached reference")
    stats = compute()
    if distributed.is_main():
        stats.save(path)
    distributed.barrier()
    return stats


def mode_mismatch(ref: Path, recorded: str, mode: str, fix: str) -> UserError:
    return UserError(f"--ref {ref} was computed in {recorded} mode but --mode is {mode}; FIDs of different modes do "
                     f"not compare, so {fix}.")


def _check_recorded(ref: Path, meta: dict[str, Any], net: FeatureNetwork, mode: str, resolution: int) -> None:
    legacy = "version" not in meta  # format 1: clean mode, same preprocessing, a SHA-256 network id, no sFID
    if not legacy and meta.get("version") != STATS_VERSION:
        raise UserError(f"--ref {ref} was written by another version of `mdt fid-ref` (format {meta.get('version')}, "
                        f"this is {STATS_VERSION}); recompute it with `mdt fid-ref`.")
    if meta.get("mode") != mode:
        raise mode_mismatch(ref, meta.get("mode"), mode, f"pass --mode {meta.get('mode')} or recompute the "
                                                         f"reference with `mdt fid-ref --mode {mode}`")
    if meta.get("resolution") != resolution:
        raise UserError(f"--ref {ref} describes {meta.get('resolution')} px images but the samples are {resolution} px; "
                        f"use reference statistics made with `mdt fid-ref --resolution {resolution}`.")
    if legacy and meta.get("feature_network") == legacy_network_id(net.choice.path):
        return
    if meta.get("feature_network") != net.sha1:
        raise UserError(f"--ref {ref} was computed with another feature network (sha1 {meta.get('feature_network')}, "
                        f"this run uses {net.sha1} from {net.choice.path}); pass that network as --inception or "
                        "recompute the reference.")


def _adm_batch(ref: Path, files: list[str], net: FeatureNetwork, opts: EvalOptions, resolution: int,
               cache_dir: Path | None) -> FeatureStats:
    images = NpzImages(ref, "--ref") if "arr_0" in files else None
    if images is not None and images.shape[1:3] != (resolution, resolution):
        raise UserError(f"--ref {ref} holds {images.shape[2]}x{images.shape[1]} reference images but the samples are "
                        f"{resolution} px; use ADM's reference batch for {resolution} px.")
    if not net.inception_v3:
        raise UserError(f"--ref {ref} is an ADM reference batch, made with TF's Inception-v3, but {net.choice.path} is "
                        "another network; drop --inception to use the installed Inception.")
    st = ref.stat()
    meta = {"format": "adm-reference-batch", "mode": opts.mode, "resolution": resolution, "source": str(ref.resolve()),
            "feature_network": net.sha1}
    computed = None
    if images is not None:
        key = ["adm-batch", str(ref.resolve()), f"{st.st_size}|{st.st_mtime_ns}", str(resolution), opts.mode, net.sha1,
               code_versions(opts.mode)]
        computed = _cached(key, cache_dir, lambda: image_stats(images, net, opts, {**meta, "num_images": len(images)},
                                                             "reference features"))
    if opts.mode != "adm":
        if computed is None:
            raise mode_mismatch(ref, "adm", opts.mode, f"pass --mode adm (this ADM reference batch has no arr_0 "
                                                       f"images to compute {opts.mode}-mode statistics from)")
        return computed
    with np.load(ref, allow_pickle=False) as data:
        adm = FeatureStats(data["mu"], data["sigma"], None, {**meta, "statistics": "the file's (ADM's evaluator)"},
                           data["mu_s"] if "mu_s" in data else None, data["sigma_s"] if "sigma_s" in data else None)
    adm.meta["num_images"] = len(images) if images is not None else None
    if computed is not None:
        adm.feats = computed.feats
    return adm


def load_reference(ref: Path, resolution: int, net: FeatureNetwork, opts: EvalOptions, cache_dir: Path | None,
                   trust_ref: bool = False) -> Reference:
    """The reference statistics for samples of `resolution` px, checked as the module docstring says."""
    if ref.is_dir():
        files = folder_images(ref, recursive=True)  # a folder of `mdt sample` as --samples reads it
        count_check(len(files), None, f"the reference folder {ref}")
        key = ["folder", str(ref.resolve()), str(resolution), opts.mode, net.sha1, code_versions(opts.mode)]
        for p in files:
            st = p.stat()
            key.append(f"{p.relative_to(ref)}|{st.st_size}|{st.st_mtime_ns}")
        meta = stats_meta(net, opts, resolution, len(files), ref)
        stats = _cached(key, cache_dir, lambda: image_stats(FileImages(files, crop_to=resolution), net, opts, meta,
                                                          "reference features"))
        return Reference(stats, "image-folder")
    if not ref.is_file():
        raise UserError(f"--ref {ref} does not exist; pass a statistics .npz, an ADM reference batch or a folder of "
                        "reference images.")
    check_npz(ref, "--ref", "pass a statistics .npz, an ADM reference batch or a folder of images.")
    try:
        with np.load(ref, allow_pickle=False) as data:
            members = list(data.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise UserError(f"--ref {ref} is not a readable npz ({err}); pass a statistics .npz, an ADM reference batch "
                        "or a folder of images.") from None
    if "meta" in members:
        stats = FeatureStats.load(ref)
        if stats.meta.get("format") != STATS_FORMAT:
            raise UserError(f"--ref {ref} has a meta record but not of `mdt fid-ref`; recompute it with `mdt fid-ref`.")
        _check_recorded(ref, stats.meta, net, opts.mode, resolution)
        return Reference(stats, STATS_FORMAT)
    if "arr_0" in members or "mu_s" in members:
        return Reference(_adm_batch(ref, members, net, opts, resolution, cache_dir), "adm-reference-batch")
    stats = FeatureStats.load(ref)
    if not trust_ref:
        raise UserError(f"--ref {ref} holds only mu/sigma (as clean-fid and pytorch-fid's --save-stats write them), "
                        "with no record of the mode, resolution and network that made them; recompute it with "
                        "`mdt fid-ref --mode MODE`, or pass --trust-ref to use it unchecked.")
    return Reference(stats, "mu-sigma (unchecked)", checked=False)
