"""Where each sample of a set of latent shards lies, and reading it back by position.

Indexing reads only tar headers (the data is seeked over) and the tiny labels; reading a sample is
then one positioned read of its moments. A failed read (an NFS hiccup, a shard truncated or
replaced under the reader) is retried with growing waits, then named in one sentence.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mdt.data.shard_format import LABEL_FIELD, MOMENTS_FIELD, decode_label, split_member_name
from mdt.data.tar_stream import TarFormatError, iter_tar_entries
from mdt.errors import UserError


@dataclass(frozen=True)
class SampleIndex:
    """Where every sample lies: shard number, byte range of its moments, header offset, label."""

    shard_paths: tuple[str, ...]
    shard: np.ndarray  # int32 (N,)
    offset: np.ndarray  # int64 (N,) start of the moments.npy bytes
    size: np.ndarray  # int64 (N,)
    header: np.ndarray  # int64 (N,) start of the sample's first tar header (to name it)
    label: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return len(self.label)


def _with_retries(what: str, attempts: int, wait_s: float, read):
    """`read()`, retried on OSError or a short read, then one sentence naming `what`."""
    for attempt in range(attempts):
        try:
            return read()
        except (OSError, TarFormatError) as err:
            if attempt == attempts - 1:
                raise UserError(f"{what} could not be read after {attempts} tries ({err}); check the file system, "
                                "then run `mdt data verify` on the data and re-encode the shards it names") from None
            time.sleep(wait_s * 2**attempt)
    raise AssertionError("unreachable")


def _index_shard(path: str, expected: int, num_classes: int) -> list[tuple[int, int, int, int]]:
    """(moments offset, size, header offset, label) of each sample of one shard, in stored order."""
    rows: dict[str, list[int]] = {}
    with open(path, "rb", buffering=1 << 16) as stream:
        for entry in iter_tar_entries(stream, os.fstat(stream.fileno()).st_size):
            key, field = split_member_name(entry.name)
            if field not in (MOMENTS_FIELD, LABEL_FIELD):
                continue
            row = rows.setdefault(key, [-1, -1, entry.header_offset, -1])
            if field == MOMENTS_FIELD:
                row[0], row[1] = entry.data_offset, entry.size
            else:
                row[3] = decode_label(os.pread(stream.fileno(), entry.size, entry.data_offset))
    for key, (offset, _, _, label) in rows.items():
        if offset < 0 or label == -1:
            raise UserError(f"sample {key} in {path} lacks its {MOMENTS_FIELD if offset < 0 else LABEL_FIELD} "
                            "member; run `mdt data verify` on the data and re-encode the shards it names")
        if not 0 <= label < num_classes:
            raise UserError(f"sample {key} has label {label}, outside the manifest's {num_classes} classes; "
                            "run `mdt data verify` on the data and re-encode the shards it names")
    if len(rows) != expected:
        raise UserError(f"{path} holds {len(rows)} samples but the manifest lists {expected}; the shard was changed "
                        "after encoding: run `mdt data verify` on the data and re-encode the shards it names")
    return [tuple(r) for r in rows.values()]


def build_index(paths: Sequence[str], counts: Sequence[int], num_classes: int, *, attempts: int = 4,
                wait_s: float = 1.0) -> SampleIndex:
    """Index every sample of the given shards (headers only; the data is seeked over)."""
    columns: list[np.ndarray] = []
    shard_of: list[np.ndarray] = []
    for number, (path, count) in enumerate(zip(paths, counts, strict=True)):
        rows = _with_retries(f"shard {path}", attempts, wait_s, lambda p=path, c=count: _index_shard(p, c, num_classes))
        columns.append(np.asarray(rows, dtype=np.int64).reshape(-1, 4))
        shard_of.append(np.full(len(rows), number, dtype=np.int32))
    table = np.concatenate(columns)
    return SampleIndex(tuple(paths), np.concatenate(shard_of), table[:, 0].copy(), table[:, 1].copy(),
                       table[:, 2].copy(), table[:, 3].copy())


class ShardReader:
    """Reads byte ranges of shards through a small cache of open files, retrying failed reads."""

    def __init__(self, index: SampleIndex, attempts: int, wait_s: float, max_open: int = 64):
        self.index = index
        self.attempts = attempts
        self.wait_s = wait_s
        self.max_open = max_open
        self.files: dict[int, int] = {}

    def read(self, shard: int, offset: int, size: int) -> bytes:
        path = self.index.shard_paths[shard]

        def attempt() -> bytes:
            try:
                data = os.pread(self._fd(shard), size, offset)
            except OSError:
                self.close(shard)
                raise
            if len(data) != size:
                self.close(shard)
                raise TarFormatError(f"truncated: {len(data)} of {size} bytes at byte {offset}")
            return data

        return _with_retries(f"shard {path}", self.attempts, self.wait_s, attempt)

    def sample_key(self, sample: int) -> str:
        """The key of a sample, read back from its tar header (for error messages)."""
        index = self.index
        with open(index.shard_paths[index.shard[sample]], "rb") as stream:
            stream.seek(int(index.header[sample]))
            entry = next(iter_tar_entries(stream, os.fstat(stream.fileno()).st_size))
        return split_member_name(entry.name)[0]

    def _fd(self, shard: int) -> int:
        if shard not in self.files:
            if len(self.files) >= self.max_open:
                self.close(next(iter(self.files)))
            self.files[shard] = os.open(self.index.shard_paths[shard], os.O_RDONLY)
        return self.files[shard]

    def close(self, shard: int | None = None) -> None:
        for number in [shard] if shard is not None else list(self.files):
            fd = self.files.pop(number, None)
            if fd is not None:
                os.close(fd)
