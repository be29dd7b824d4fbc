"""Builders for the sampling and FID tests: a tiny checkpoint export, a tiny VAE, a stand-in Inception."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import ONE_THREAD
from model_helpers import randomize
from torch import nn

from mdt.diffusion.edm import EDMConfig
from mdt.diffusion.schedule import ScheduleConfig
from mdt.fileio import write_json
from mdt.models import create_model, save_pretrained

NUM_CLASSES = 10
CLASS_NAMES = [f"class-{k}" for k in range(NUM_CLASSES)]
# helpers.run_cli options for `mdt sample`/`mdt fid`: one thread (rank counts and reruns compare equal),
# a long bound.
SAMPLING_RUN = {"env": ONE_THREAD, "timeout": 300}


def make_export(
    directory: Path,
    *,
    vae_spec: str,
    model_name: str = "DiT-T/2",
    latent_shape: tuple[int, int, int] = (4, 8, 8),
    resolution: int = 64,
    kind: str = "autoencoder-kl",
    scaling_factor: float = 0.18215,
    learn_sigma: bool = True,
    edm: bool = False,
) -> Path:
    """An EMA export folder as the trainer writes it: weights, model config, diffusion.json (DDPM, or
    EDM with `edm`), manifest."""
    c, h, _ = latent_shape
    learn_sigma = learn_sigma and not edm
    model = randomize(create_model(model_name, input_size=h, in_channels=c, num_classes=NUM_CLASSES,
                                   learn_sigma=learn_sigma))
    save_pretrained(model, directory)
    diffusion = EDMConfig() if edm else ScheduleConfig(learn_sigma=learn_sigma)
    write_json(directory / "diffusion.json", diffusion.to_dict())
    write_json(directory / "data_manifest.json", {
        "format": "mdt-latents",
        "resolution": resolution,
        "latent_shape": list(latent_shape),
        "vae": {"spec": vae_spec, "kind": kind, "scaling_factor": scaling_factor},
        "classes": CLASS_NAMES,
        "num_classes": NUM_CLASSES,
    })
    return directory


class _StandInLayers(nn.Module):
    """Cheap deterministic features from (B, 3, 299, 299) images in [-1, 1], like Inception's `layers`."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.proj = nn.Parameter(torch.randn(48, 16, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)  # (B, 48)
        return torch.tanh(pooled @ self.proj)[:, :, None, None]  # (B, 16, 1, 1) like Inception's pool


class _StandInInception(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.layers = _StandInLayers(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _StandInWithHead(_StandInInception):
    """Also a classifier head `output` (Linear 16 -> 10), as clean-fid's Inception has (2048 -> 1008)."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.output = nn.Linear(16, 10)
        with torch.no_grad():
            self.output.weight.copy_(torch.randn(10, 16, generator=torch.Generator().manual_seed(seed + 1)) * 4)


def write_stand_in_inception(path: Path, *, seed: int = 0, head: bool = False) -> Path:
    """A TorchScript file with clean-fid's Inception interface (a `layers` submodule; `output` with `head`)."""
    module = _StandInWithHead(seed) if head else _StandInInception(seed)
    torch.jit.save(torch.jit.script(module), str(path))
    return path
