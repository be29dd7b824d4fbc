"""The frozen autoencoder between pixels and latents.

`load_autoencoder(spec)` accepts a Hugging Face hub id, a local diffusers folder, a single
`.safetensors` checkpoint (with a local config folder), an LDM-format `.pth`/`.pt`/`.ckpt` state dict
such as MaskDiT's `autoencoder_kl.pth` (see `mdt.vae_ldm`), or `pixel` (the identity, for pixel-space
diffusion as in MaskDM), and returns an `Autoencoder` with one small interface:

- `encode_moments(pixels)`: pixels in [-1, 1], NCHW -> the posterior's (mean, std), unscaled.
- `decode(latents)`: SCALED latents (what the diffusion model produces) -> pixels in [-1, 1].

The weights are frozen and in eval mode; fp32 on CPU, bf16 (or fp16) on GPU. Nothing here
downloads anything when a local copy exists, and an offline run without one fails at once with a
sentence saying how to point `--vae` at a local folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from mdt.distributed import default_device
from mdt.errors import UserError
from mdt.fileio import check_safetensors
from mdt.vae_ldm import TORCH_SUFFIXES, first_line, load_ldm_file

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
PIXEL_SPEC = "pixel"
# "owner/name" (or a bare legacy name) as the hub spells repository ids.
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@dataclass
class Autoencoder:
    """A frozen autoencoder (or the pixel identity) with the facts later stages need.

    `module` is the diffusers `AutoencoderKL`, or None for `pixel`.
    """

    spec: str
    kind: str  # "autoencoder-kl" or "pixel"
    scaling_factor: float
    shift_factor: float
    latent_channels: int
    downsample: int
    device: torch.device
    dtype: torch.dtype
    config_dir: str | None = None
    module: torch.nn.Module | None = None

    @torch.inference_mode()
    def encode_moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, std) of `pixels` in [-1, 1], shape (B, 3, H, W); float32, unscaled.

        For `pixel` the mean is the pixels themselves and the std is zero.
        """
        if self.module is None:
            mean = pixels.to(self.device, torch.float32)
            return mean, torch.zeros_like(mean)
        posterior = self.module.encode(pixels.to(self.device, self.dtype)).latent_dist
        return posterior.mean.float(), posterior.std.float()

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] from SCALED latents (B, C, h, w), as the diffusion model produces them."""
        if self.module is None:
            return latents.to(self.device, torch.float32).clamp(-1, 1)
        unscaled = latents.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
        pixels = self.module.decode(unscaled.to(self.dtype)).sample
        return pixels.float().clamp(-1, 1)

    def scale(self, unscaled: torch.Tensor) -> torch.Tensor:
        """Unscaled posterior sample -> the scaled latent the diffusion model trains on."""
        return (unscaled - self.shift_factor) * self.scaling_factor

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, H, W) of the latent of a `resolution` x `resolution` image."""
        side = resolution // self.downsample
        return (self.latent_channels, side, side)


def load_autoencoder(
    spec: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    config: str | os.PathLike[str] | None = None,
) -> Autoencoder:
    """Load the autoencoder named by `spec`: a hub id, a local diffusers folder, a `.safetensors`
    file, an LDM-format `.pth`/`.pt`/`.ckpt` state dict or `pixel`.

    For a single file the architecture comes from `config` (a folder holding the diffusers
    `config.json`), or from a `config.json` beside the file when `config` is None; a torch file with
    neither gets the SD kl-f8 architecture that MaskDiT's `autoencoder_kl.pth` has.
    `dtype` defaults to float32 on CPU and bfloat16 on GPU.
    """
    device = torch.device(device) if device is not None else default_device()
    if spec == PIXEL_SPEC:
        return Autoencoder(
            spec=PIXEL_SPEC,
            kind="pixel",
            scaling_factor=1.0,
            shift_factor=0.0,
            latent_channels=3,
            downsample=1,
            device=device,
            dtype=torch.float32,
        )
    if dtype is None:
        dtype = _default_dtype(device)

    config_dir: str | None = None
    path = Path(spec).expanduser()
    if spec.endswith((".safetensors", *TORCH_SUFFIXES)) or path.is_file():
        module, config_dir = _load_single_file(path, config, dtype)
    elif path.is_dir():
        module = _load_folder(path, dtype)
    elif _HUB_ID.match(spec) and not spec.startswith("."):
        module = _load_hub(spec, dtype)
    else:
        raise UserError(
            f"--vae {spec}: no such file or folder; pass an existing local path, a hub id or 'pixel'."
        )

    module.requires_grad_(False)
    module.eval()
    if device.type != "cpu":  # loaded on the CPU; diffusers warns about a no-op .to() too
        module.to(device=device)
    cfg = module.config
    num_down = len(cfg.block_out_channels) - 1
    # Local paths are recorded absolute, so a later stage finds them from any working directory.
    recorded_spec = str(path.resolve()) if path.exists() else spec
    return Autoencoder(
        spec=recorded_spec,
        kind="autoencoder-kl",
        scaling_factor=float(cfg.scaling_factor),
        shift_factor=float(cfg.shift_factor or 0.0),
        latent_channels=int(cfg.latent_channels),
        downsample=2**num_down,
        device=device,
        dtype=dtype,
        config_dir=config_dir,
        module=module,
    )


def _default_dtype(device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    # bf16 has fp32's range, so the SD-VAE cannot overflow as it does in fp16.
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autoencoder_kl():
    from diffusers import AutoencoderKL

    return AutoencoderKL


def _load_kwargs(dtype: torch.dtype) -> dict:
    # low_cpu_mem_usage needs `accelerate`; a VAE is small, so load it the plain way.
    return {"torch_dtype": dtype, "low_cpu_mem_usage": False}


@contextlib.contextmanager
def _quiet_hub_warning() -> Iterator[None]:
    """Hide the deprecation warning diffusers triggers inside huggingface_hub; nothing to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        yield


def _diffusers_folder(folder: Path) -> tuple[Path, str | None]:
    """(folder, subfolder) holding config.json: the folder itself or a pipeline's `vae/`."""
    if (folder / "config.json").is_file():
        return folder, None
    if (folder / "vae" / "config.json").is_file():
        return folder, "vae"
    raise UserError(
        f"--vae {folder}: the folder has no config.json (nor vae/config.json); "
        "save the autoencoder there with AutoencoderKL.save_pretrained or pass a hub id."
    )


def _load_folder(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    root, subfolder = _diffusers_folder(folder)
    weights = root / (subfolder or "") / "diffusion_pytorch_model.safetensors"
    if weights.is_file():  # diffusers' own complaint about a cut file names neither the cause nor the fix
        check_safetensors(weights, "download or save the autoencoder again")
    try:
        return _autoencoder_kl().from_pretrained(
            root, subfolder=subfolder, local_files_only=True, **_load_kwargs(dtype)
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(
            f"--vae {folder}: could not load an AutoencoderKL from this folder ({first_line(err)}); "
            "point it at a folder written by AutoencoderKL.save_pretrained."
        ) from err


def _load_single_file(
    path: Path, config: str | os.PathLike[str] | None, dtype: torch.dtype
) -> tuple[torch.nn.Module, str]:
    if not path.is_file():
        raise UserError(f"--vae {path}: no such file; pass an existing .safetensors or .pth checkpoint.")
    if path.suffix in TORCH_SUFFIXES:
        return load_ldm_file(path, config, dtype)
    if path.suffix != ".safetensors":
        raise UserError(
            f"--vae {path}: only .safetensors files and LDM-format {'/'.join(TORCH_SUFFIXES)} state dicts "
            "are loaded; convert it to one of these first."
        )
    check_safetensors(path, "download it again or pass another --vae")  # not "check --vae-config" for a cut file
    config_dir = Path(config).expanduser() if config is not None else path.parent
    if not (config_dir / "config.json").is_file():
        raise UserError(
            f"--vae {path}: no config.json in {config_dir}; pass --vae-config DIR with the diffusers "
            "config.json of this autoencoder (e.g. the vae folder of its hub repo)."
        )
    try:
        with _quiet_hub_warning():
            module = _autoencoder_kl().from_single_file(
                path, config=str(config_dir), local_files_only=True, torch_dtype=dtype
            )
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise UserError(
            f"--vae {path}: could not load it with the config in {config_dir} ({first_line(err)}); "
            "check that --vae-config matches this checkpoint."
        ) from err
    return module, str(config_dir.resolve())


def _load_hub(repo_id: str, dtype: torch.dtype) -> torch.nn.Module:
    autoencoder_kl = _autoencoder_kl()
    try:
        # The local cache first: no network round trip when the weights are already here.
        with _quiet_hub_warning():
            return autoencoder_kl.from_pretrained(repo_id, local_files_only=True, **_load_kwargs(dtype))
    except OSError:
        pass
    offline_hint = (
        f"download it where there is network (`hf download {repo_id} --local-dir DIR`) and pass --vae DIR"
    )
    if not _hub_reachable():
        raise UserError(
            f"--vae {repo_id}: not in the local Hugging Face cache and the hub cannot be reached; {offline_hint}."
        )
    try:
        return autoencoder_kl.from_pretrained(repo_id, **_load_kwargs(dtype))
    except OSError as err:
        raise UserError(
            f"--vae {repo_id}: could not load it from the hub ({first_line(err)}); "
            f"check the id, or {offline_hint}."
        ) from err


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the hub answers a TCP connection; huggingface_hub itself retries for ~30 s."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False
