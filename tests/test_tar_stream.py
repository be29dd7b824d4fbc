"""The lean tar reader agrees with tarfile, and fails loudly on damaged input."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from mdt.data.shard_format import MomentsDecoder, encode_moments, group_samples
from mdt.data.tar_stream import TarFormatError, iter_tar_members


def make_tar(members: dict[str, bytes], fmt: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        directory = tarfile.TarInfo("folder")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


MEMBERS = {
    "k1.cls": b"7",
    "k1.moments.npy": bytes(range(256)) * 3,
    "k2.cls": b"",  # an empty member
    "d" * 120 + "/k3.cls": b"12",  # longer than the 100-byte name field
    "x/ünïcode.json": b"{}",
}


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_match_tarfile(fmt: int) -> None:
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else {k: v for k, v in MEMBERS.items() if len(k) < 100}
    data = make_tar(members, fmt)
    assert dict(iter_tar_members(io.BytesIO(data))) == members
    only_cls = dict(iter_tar_members(io.BytesIO(data), wanted=lambda name: name.endswith(".cls")))
    assert only_cls == {k: v for k, v in members.items() if k.endswith(".cls")}


def test_samples_group_by_key_up_to_the_first_dot() -> None:
    data = make_tar(MEMBERS, tarfile.GNU_FORMAT)
    samples = list(group_samples(iter_tar_members(io.BytesIO(data))))
    assert [s.key for s in samples] == ["k1", "k2", "d" * 120 + "/k3", "x/ünïcode"]
    assert set(samples[0].fields) == {"cls", "moments.npy"}


def test_truncation_and_corruption_raise() -> None:
    data = make_tar(MEMBERS, tarfile.GNU_FORMAT)
    for cut in (700, 1030, 2100):  # inside a header, a padding, a payload
        with pytest.raises(TarFormatError):
            list(iter_tar_members(io.BytesIO(data[:cut])))
    corrupt = bytearray(data)
    corrupt[512 + 130] ^= 0x01  # a size digit of the second header
    with pytest.raises(TarFormatError, match="checksum"):
        list(iter_tar_members(io.BytesIO(bytes(corrupt))))
    with pytest.raises(TarFormatError):
        list(iter_tar_members(io.BytesIO(b"not a tar at all" * 40)))


def test_moments_decoder_fast_path_equals_np_load() -> None:
    array = np.random.default_rng(0).standard_normal((2, 2, 4, 8, 8)).astype(np.float16)
    decode = MomentsDecoder(array.shape)
    assert np.array_equal(decode(encode_moments(array)), array)
    other = np.ones((3, 5), dtype=np.float16)  # a different shape takes the checked np.load path
    assert np.array_equal(decode(encode_moments(other)), other)
    with pytest.raises(ValueError):
        decode(b"\x93NUMPY garbage")
