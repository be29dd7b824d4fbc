"""Inception features of an image set, on one process or split over many (torchrun).

Images come from files (optionally ADM-center-cropped, for reference folders) or from the `arr_0`
array of an npz (`mdt sample`'s samples.npz, ADM's reference batches), read a row at a time so a
50k x 512 px file never has to fit in memory. Batches are the fixed index ranges
[kB, (k+1)B); batch k runs on rank k mod W, and the ranks' features are gathered in index order,
so W processes compute exactly the batches one process computes and return the same numbers.
"""

from __future__ import annotations

import math
import re
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mdt import distributed
from mdt.errors import UserError
from mdt.eval.network import FeatureNetwork
from mdt.eval.resize import SIZE, network_input

IMAGE_SUFFIXES = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}
SAMPLE_NAME = re.compile(r"\d{6,}\.png")  # mdt.sample.images.sample_path: {i:06d}.png


def list_images(folder: Path, recursive: bool) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def folder_images(folder: Path, recursive: bool) -> list[Path]:
    """The images of a folder, read the same way as samples and as references: `mdt sample`'s {i:06d}.png
    files in index order when there are any (never its grid.png), else every image (with `recursive`, in
    subfolders too)."""
    numbered = sorted((p for p in folder.glob("*.png") if SAMPLE_NAME.fullmatch(p.name)), key=lambda p: int(p.stem))
    return numbered or list_images(folder, recursive)


def common_resolution(files: Sequence[Path], what: str = "--samples") -> tuple[int, int]:
    """The (width, height) all `files` share; a UserError naming two that differ."""
    first: tuple[Path, tuple[int, int]] | None = None
    for path in files:
        try:
            with Image.open(path) as img:  # reads the header only
                size = img.size
        except (OSError, ValueError) as err:  # empty, cut in its header, or not an image at all
            raise UserError(f"{path} cannot be read as an image ({err}); replace or remove it.") from None
        if first is None:
            first = (path, size)
        elif size != first[1]:
            raise UserError(
                f"{what} mixes resolutions ({first[0].name} is {first[1][0]}x{first[1][1]}, {path.name} is "
                f"{size[0]}x{size[1]}); evaluate one resolution at a time."
            )
    assert first is not None
    return first[1]


class FileImages:
    """Image files as uint8 (H, W, 3); `crop_to` applies ADM's center crop (reference folders)."""

    def __init__(self, files: Sequence[Path], crop_to: int | None = None) -> None:
        self.files = list(files)
        self.crop_to = crop_to

    def __len__(self) -> int:
        return len(self.files)

    def image(self, i: int) -> np.ndarray:
        with Image.open(self.files[i]) as img:
            img = img.convert("RGB")
            if self.crop_to is not None:
                from mdt.data.images import center_crop_adm

                img = center_crop_adm(img, self.crop_to)
            return np.asarray(img)


class NpzImages:
    """The `arr_0` (N, H, W, 3) uint8 member of an npz, one row per read (the zip stays closed between runs)."""

    def __init__(self, path: Path, what: str, key: str = "arr_0") -> None:
        self.path, self.what, self.key = path, what, key
        self._zip: zipfile.ZipFile | None = None
        try:
            with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(f)
                self.offset = f.tell()
        except KeyError:
            raise UserError(f"{what} {path} has no {key} array; pass an npz whose {key} holds uint8 (N, H, W, 3) "
                            "images (the samples.npz of `mdt sample`, or an ADM reference batch).") from None
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise UserError(f"{what} {path} is not a readable npz ({err}); write it again (`mdt sample` "
                            "rewrites samples.npz from the PNGs).") from None
        if dtype != np.uint8 or fortran or len(shape) != 4 or shape[-1] != 3:
            raise UserError(f"{what} {path} holds {key} of {dtype} {shape}, not uint8 (N, H, W, 3) images; pass the "
                            "samples.npz of `mdt sample` or an ADM reference batch.")
        self.shape = tuple(int(s) for s in shape)
        self.row_bytes = self.shape[1] * self.shape[2] * 3
        with zipfile.ZipFile(path) as zf:
            stored = zf.getinfo(f"{key}.npy").file_size
        if stored != self.offset + self.shape[0] * self.row_bytes:
            raise UserError(f"{what} {path} is truncated ({stored} bytes of {key}, its header promises "
                            f"{self.offset + self.shape[0] * self.row_bytes}); write it again.")

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_zip": None}  # each DataLoader worker opens its own handle

    def image(self, i: int) -> np.ndarray:
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.path)
        with self._zip.open(f"{self.key}.npy") as f:
            f.seek(self.offset + i * self.row_bytes)
            data = f.read(self.row_bytes)
        if len(data) != self.row_bytes:
            raise UserError(f"{self.what} {self.path} ends inside image {i}; write it again.")
        return np.frombuffer(data, dtype=np.uint8).reshape(self.shape[1:])


ImageSource = FileImages | NpzImages


class _Resized(Dataset):
    def __init__(self, source: ImageSource, mode: str) -> None:
        self.source, self.mode = source, mode

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        """Image i as Inception's (3, 299, 299) float32 input in this mode, and "" or why it could not be
        read (raised by the caller: an exception raised in a loader worker would reach the user wrapped in
        the worker's traceback)."""
        try:
            return network_input(self.source.image(i), self.mode), ""
        except UserError as err:
            return torch.zeros(3, SIZE, SIZE), str(err)
        except (OSError, ValueError) as err:
            name = self.source.files[i] if isinstance(self.source, FileImages) else f"image {i} of {self.source.path}"
            return torch.zeros(3, SIZE, SIZE), f"{name} cannot be read as an image ({err}); replace or remove it."


@dataclass
class Features:
    pool: np.ndarray  # (N, D) float32
    spatial: np.ndarray | None  # (N, 2023) sFID features, when the network is Inception-v3
    logits: np.ndarray | None  # (N, K) when the network has its classifier head
    images_per_second: float


def _gather_batches(local: np.ndarray, batches: list[list[int]], world: int, batch_size: int) -> np.ndarray:
    """Every rank's rows of its batches (k = rank, rank + W, ...) -> all rows in index order."""
    slots = math.ceil(len(batches) / world)
    dim = torch.tensor([local.shape[1] if local.ndim == 2 and len(local) else 0], dtype=torch.int64)
    device = torch.device("cuda", distributed.local_rank()) if dist.get_backend() == "nccl" else torch.device("cpu")
    dim = dim.to(device)
    dist.all_reduce(dim, op=dist.ReduceOp.MAX)
    padded = torch.zeros(slots * batch_size, int(dim.item()), dtype=torch.float32, device=device)
    if len(local):
        padded[: len(local)] = torch.from_numpy(local).to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    rows = []
    for k, batch in enumerate(batches):
        lo = (k // world) * batch_size
        rows.append(parts[k % world][lo : lo + len(batch)].cpu().numpy())
    return np.concatenate(rows)


def extract_features(source: ImageSource, net: FeatureNetwork, mode: str, *, batch_size: int = 64,
                     num_workers: int = 4, verbose: bool = True, desc: str = "features") -> Features:
    """Features of every image of `source` with the resize of `mode`, on all ranks of the process group."""
    n = len(source)
    batches = [list(range(lo, min(lo + batch_size, n))) for lo in range(0, n, batch_size)]
    rank, world = distributed.get_rank(), distributed.get_world_size()
    mine = batches[rank::world]
    loader = DataLoader(_Resized(source, mode), batch_sampler=mine, num_workers=num_workers)
    keys = ["pool", *(["spatial"] if net.has_spatial else []), *(["logits"] if net.has_logits else [])]
    local: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    count = sum(len(b) for b in mine)
    suffix = f" (rank 0 of {world})" if world > 1 else ""
    start = time.perf_counter()
    with tqdm(total=count, unit="img", desc=f"{desc} [{mode}]{suffix}", disable=not verbose or rank != 0,
              dynamic_ncols=True) as bar:
        for images, problems in loader:
            if any(problems):
                raise UserError(next(p for p in problems if p))
            out = net(images)
            for k in keys:
                local[k].append(out[k].numpy())
            bar.update(len(images))
    seconds = max(time.perf_counter() - start, 1e-9)
    arrays = {k: np.concatenate(v) if v else np.zeros((0, 0), np.float32) for k, v in local.items()}
    if world > 1 and distributed.is_initialized():
        arrays = {k: _gather_batches(v, batches, world, batch_size) for k, v in arrays.items()}
        seconds = distributed.all_reduce_sum(seconds) / world
    return Features(arrays["pool"], arrays.get("spatial"), arrays.get("logits"), n / seconds)
