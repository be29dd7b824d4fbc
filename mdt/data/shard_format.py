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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from mdt.data.tar_stream import iter_tar_members

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


def split_member_name(name: str) -> tuple[str, str]:
    """(key, field) as WebDataset splits a member name: the key ends at the basename's first dot."""
    directory, _, basename = name.rpartition("/")
    stem, _, field = basename.partition(".")
    return (f"{directory}/{stem}" if directory else stem), field


def group_samples(members: Iterable[tuple[str, bytes]]) -> Iterator[RawSample]:
    """Consecutive members with the same key, as one sample."""
    current: RawSample | None = None
    for name, data in members:
        key, field = split_member_name(name)
        if current is None or key != current.key:
            if current is not None:
                yield current
            current = RawSample(key, {})
        current.fields[field] = data
    if current is not None:
        yield current


def iter_tar_samples(path: str | Path, fields: Iterable[str] | None = None) -> Iterator[RawSample]:
    """Samples of one shard in stored order (only `fields` read, when given); raises TarFormatError
    or OSError on a damaged shard."""
    wanted = None
    if fields is not None:
        suffixes = tuple("." + f for f in fields)
        wanted = lambda name: name.endswith(suffixes)  # noqa: E731
    with open(path, "rb", buffering=1 << 20) as stream:
        yield from group_samples(iter_tar_members(stream, wanted))


class MomentsDecoder:
    """Decodes `moments.npy` bytes of a known shape fast: when the .npy header is byte for byte the
    one np.save writes for (shape, float16), the payload is used directly; anything else goes
    through np.load (without pickle), which checks it."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)
        reference = encode_moments(np.zeros(self.shape, dtype=np.float16))
        self.nbytes = int(np.prod(self.shape)) * 2
        self.header = reference[: len(reference) - self.nbytes]

    def __call__(self, data: bytes) -> np.ndarray:
        if len(data) == len(self.header) + self.nbytes and data.startswith(self.header):
            return np.frombuffer(data, dtype=np.float16, offset=len(self.header)).reshape(self.shape)
        return decode_moments(data)
