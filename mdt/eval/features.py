"""Inception features of image sets, computed with clean-fid's "clean" pipeline.

clean-fid resizes every image with PIL bicubic to 299 x 299 in float (no uint8 rounding) and runs
the TorchScript Inception of StyleGAN2-ADA. The weights come from clean-fid's own cache file or
from `--inception PATH`; nothing is downloaded here, so a machine without network fails at once
with the place to put the file.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from cleanfid.fid import get_batch_features, get_files_features
from cleanfid.resize import build_resizer
from cleanfid.utils import EXTENSIONS
from PIL import Image
from torch import Tensor, nn

from mdt.errors import UserError

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
MODE = "clean"


def clean_fid_cache_path() -> Path:
    """Where clean-fid itself keeps the Inception TorchScript (its hard-coded cache folder)."""
    folder = "./" if platform.system() == "Windows" else "/tmp"
    return Path(folder) / "inception-2015-12-05.pt"


class FeatureNetwork(nn.Module):
    """clean-fid's Inception wrapper for any TorchScript with the same interface.

    The TorchScript module must have a `layers` submodule that maps (B, 3, 299, 299) images
    normalised to [-1, 1] to features viewable as (B, D), as clean-fid's Inception does (D = 2048).
    """

    def __init__(self, path: Path, device: torch.device) -> None:
        super().__init__()
        self.path = path
        self.device = device
        self.base = torch.jit.load(str(path), map_location="cpu").eval()
        self.digest = file_digest(path)
        self.to(device)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, 3, 299, 299) in [0, 255] -> (B, D) features."""
        return self.base.layers.forward((x - 128) / 128).view(x.shape[0], -1)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(functools.partial(f.read, 1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def load_feature_network(path: Path | None, device: torch.device) -> FeatureNetwork:
    """The network at `path`, else clean-fid's cached Inception; a clear error when neither exists."""
    if path is not None:
        if not Path(path).is_file():
            raise UserError(f"--inception {path}: no such file; pass the path of inception-2015-12-05.pt.")
        chosen = Path(path)
    else:
        chosen = clean_fid_cache_path()
        if not chosen.is_file():
            raise UserError(
                f"The Inception weights are not at {chosen} and will not be downloaded here; download "
                f"{INCEPTION_URL} to {chosen} (where clean-fid looks) or pass --inception PATH."
            )
    try:
        net = FeatureNetwork(chosen, device)
    except RuntimeError as err:
        raise UserError(f"{chosen} is not a TorchScript Inception network ({err}); download it again.") from None
    return net


def list_images(folder: Path, recursive: bool) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lstrip(".") in EXTENSIONS)


def common_resolution(files: Sequence[Path]) -> tuple[int, int]:
    """The (width, height) all `files` share; a UserError naming two that differ."""
    first: tuple[Path, tuple[int, int]] | None = None
    for path in files:
        with Image.open(path) as img:  # reads the header only
            size = img.size
        if first is None:
            first = (path, size)
        elif size != first[1]:
            raise UserError(
                f"--samples mixes resolutions ({first[0].name} is {first[1][0]}x{first[1][1]}, {path.name} is "
                f"{size[0]}x{size[1]}); evaluate one resolution at a time."
            )
    assert first is not None
    return first[1]


def _adm_crop(image: np.ndarray, resolution: int) -> np.ndarray:
    from mdt.data.images import center_crop_adm

    return np.asarray(center_crop_adm(Image.fromarray(image), resolution))


def files_features(
    files: Sequence[Path],
    net: FeatureNetwork,
    *,
    crop_to: int | None = None,
    batch_size: int = 64,
    num_workers: int = 4,
    verbose: bool = True,
) -> np.ndarray:
    """(N, D) float32 features of image files; `crop_to` applies ADM's center crop first (reference sets)."""
    return get_files_features(
        [str(f) for f in files],
        model=net,
        num_workers=num_workers,
        batch_size=batch_size,
        device=net.device,
        mode=MODE,
        custom_image_tranform=None if crop_to is None else functools.partial(_adm_crop, resolution=crop_to),
        description="features",
        verbose=verbose,
    ).astype(np.float32)


def array_features(images: np.ndarray, net: FeatureNetwork, *, batch_size: int = 64) -> np.ndarray:
    """(N, D) float32 features of uint8 (N, H, W, 3) images, with clean-fid's resize as for files."""
    resize = build_resizer(MODE)
    feats = []
    for lo in range(0, len(images), batch_size):
        batch = np.stack([resize(img) for img in images[lo : lo + batch_size]])  # (B, 299, 299, 3) float32
        feats.append(get_batch_features(torch.from_numpy(batch).permute(0, 3, 1, 2), net, net.device))
    return np.concatenate(feats).astype(np.float32)
