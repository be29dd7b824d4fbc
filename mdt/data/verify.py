"""`mdt data verify` and `mdt data info`: re-read a latent dataset and check it against its manifest."""

from __future__ import annotations

import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mdt.data.manifest import Manifest, read_manifest
from mdt.data.shard_format import (
    LABEL_FIELD,
    MOMENTS_FIELD,
    SOURCE_FIELD,
    decode_label,
    decode_moments,
    decode_source,
    iter_tar_samples,
)


@dataclass
class VerifyReport:
    manifest: Manifest
    samples_checked: int = 0
    problems: list[str] = field(default_factory=list)  # one line per bad or missing shard

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_dataset(data_dir: str | Path, progress: bool = True) -> VerifyReport:
    """Re-read every shard: sample counts, fields, shapes, dtypes and labels against the manifest,
    and keys unique across shards."""
    manifest = read_manifest(data_dir)
    report = VerifyReport(manifest)
    seen_keys: dict[str, str] = {}
    for shard in tqdm(manifest.shards, unit="shard", desc="verify", disable=not progress):
        problem = _check_shard(manifest, shard.name, shard.count, seen_keys, report)
        if problem:
            report.problems.append(f"{shard.name}: {problem}")
    listed = {s.name for s in manifest.shards}
    total = sum(s.count for s in manifest.shards)
    if total != manifest.total:
        report.problems.append(
            f"manifest.json: total is {manifest.total} but the shard counts sum to {total}"
        )
    for stray in sorted(p.name for p in Path(data_dir).glob("*.tar") if p.name not in listed):
        report.problems.append(f"{stray}: a tar file not listed in manifest.json")
    return report


def _check_shard(
    manifest: Manifest, name: str, expected: int, seen_keys: dict[str, str], report: VerifyReport
) -> str | None:
    path = manifest.shard_path(name)
    if not path.is_file():
        return "missing"
    count = 0
    try:
        for sample in iter_tar_samples(path):
            problem = _check_sample(manifest, sample.key, sample.fields)
            if problem:
                return f"sample {sample.key}: {problem}"
            if sample.key in seen_keys:
                return f"sample {sample.key} also appears in {seen_keys[sample.key]}"
            seen_keys[sample.key] = name
            count += 1
    except (tarfile.TarError, OSError, EOFError) as err:
        return f"unreadable after {count} samples ({type(err).__name__}: {err})"
    finally:
        report.samples_checked += count
    if count != expected:
        return f"holds {count} samples, the manifest says {expected}"
    return None


def _check_sample(manifest: Manifest, key: str, fields: dict[str, bytes]) -> str | None:
    missing = [f for f in (MOMENTS_FIELD, LABEL_FIELD, SOURCE_FIELD) if f not in fields]
    if missing:
        return f"no {missing[0]} member"
    try:
        moments = decode_moments(fields[MOMENTS_FIELD])
        label = decode_label(fields[LABEL_FIELD])
        decode_source(fields[SOURCE_FIELD])
    except ValueError as err:  # includes JSON and npy format errors
        return f"undecodable ({err})"
    if moments.shape != manifest.sample_shape:
        return f"{MOMENTS_FIELD} has shape {moments.shape}, expected {manifest.sample_shape}"
    if moments.dtype != np.dtype(manifest.dtype):
        return f"{MOMENTS_FIELD} has dtype {moments.dtype}, expected {manifest.dtype}"
    if not np.isfinite(moments).all():
        return f"{MOMENTS_FIELD} holds NaN or infinity"
    if not 0 <= label < manifest.num_classes:
        return f"label {label} outside [0, {manifest.num_classes})"
    return None


def dataset_info(data_dir: str | Path) -> str:
    """A few lines summarising a latent dataset, from its manifest (no shard is read)."""
    m = read_manifest(data_dir)
    counts = Counter(s.count for s in m.shards)
    size = sum(m.shard_path(s.name).stat().st_size for s in m.shards if m.shard_path(s.name).is_file())
    per_sample = size / m.total if m.total else 0.0
    lines = [
        f"dataset      {Path(data_dir).resolve()}",
        f"samples      {m.total} in {len(m.shards)} shards ({m.rejected} inputs rejected)",
        "shard sizes  " + ", ".join(f"{n} x {c}" for c, n in sorted(counts.items(), reverse=True)),
        f"resolution   {m.resolution} px -> latents {'x'.join(map(str, m.latent_shape))} ({m.dtype})",
        f"stored       {'/'.join(m.moments)} per view, views: {', '.join(m.views)}",
        f"vae          {m.vae_spec} ({m.vae_kind}, scaling factor {m.scaling_factor:g})",
        f"classes      {m.num_classes} ({', '.join(m.classes[:3])}{', ...' if m.num_classes > 3 else ''})",
        f"on disk      {size / 2**20:.1f} MiB ({per_sample / 1024:.1f} KiB per sample)",
        f"written by   mdt {m.mdt_version}",
    ]
    return "\n".join(lines)
