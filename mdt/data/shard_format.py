"""The layout of one latent sample inside a WebDataset tar, shared by writer, reader and verify.

Each sample has three members, named `<key>.<field>` (the key holds no dot, as WebDataset cuts
the key at the first dot):

- `moments.npy`: float16 array (views, moments, C, H, W). Views are [original] or
  [original, hflip] (`--flip`); moments are [mean, std] of the VAE posterior, or [mean] alone for
  `pixel` (the pixels, nothing to sample). Stored with numpy's .npy format, read without pickle.
- `cls`: the label as decimal text (WebDataset's convention).
- `json`: where the sample came from: source relpath, class name, label, original size and mode.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

MOMENTS_FIELD = "moments.npy"
LABEL_FIELD = "cls"
SOURCE_FIELD = "json"
FIELDS = (MOMENTS_FIELD, LABEL_FIELD, SOURCE_FIELD)
STORAGE_DTYPE = "float16"
VIEWS_PLAIN = ("original",)
VIEWS_FLIP = ("original", "hflip")
MOMENTS_KL = ("mean", "std")
MOMENTS_PIXEL = ("mean",)


def sample_key(index: int) -> str:
    """The key of the index-th input (in sorted input order): digits only, so no dot."""
    return f"{index:09d}"


def encode_moments(moments: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(moments, dtype=np.float16), allow_pickle=False)
    return buffer.getvalue()


def decode_moments(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_label(label: int) -> bytes:
    return str(int(label)).encode()


def decode_label(data: bytes) -> int:
    return int(data.decode("ascii").strip())


def encode_source(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True).encode()


def decode_source(data: bytes) -> dict[str, Any]:
    return json.loads(data.decode("utf-8"))


class TarShardWriter:
    """Writes samples to an open tar with fixed metadata, so equal inputs give equal bytes."""

    def __init__(self, fileobj: BinaryIO):
        self._tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def write(self, key: str, moments: np.ndarray, label: int, source: dict[str, Any]) -> None:
        members = (
            (MOMENTS_FIELD, encode_moments(moments)),
            (LABEL_FIELD, encode_label(label)),
            (SOURCE_FIELD, encode_source(source)),
        )
        for field, data in members:
            info = tarfile.TarInfo(f"{key}.{field}")
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        self._tar.close()


@dataclass
class RawSample:
    key: str
    fields: dict[str, bytes]


def iter_tar_samples(path: str | Path) -> Iterator[RawSample]:
    """Samples of one shard in stored order, grouped by key (raises tarfile/OS errors as found)."""
    with tarfile.open(path, mode="r|") as tar:
        current: RawSample | None = None
        for info in tar:
            if not info.isfile():
                continue
            key, _, field = info.name.partition(".")
            handle = tar.extractfile(info)
            data = handle.read() if handle is not None else b""
            if current is None or key != current.key:
                if current is not None:
                    yield current
                current = RawSample(key, {})
            current.fields[field] = data
        if current is not None:
            yield current
