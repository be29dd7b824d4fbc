"""Throughput of `mdt encode` against the plain loop reference repos use to extract latents.

The plain loop (as in fast-DiT's extract_features.py): an ImageFolder-style dataset doing the ADM
crop + ToTensor + Normalize, a DataLoader, `vae.encode(x).latent_dist.sample() * scale`, and one
.npy file per image. The encode stage: `mdt.data.encode.encode_dataset` on the same images with
the same VAE (shards, moments, manifest, rejects). Both run in this process, alternating, on
files already in the page cache; the best of --repeats runs counts.

Prints one JSON line per figure (images/s per configuration), then the ratios.

    python tools/benchmarks/bench_encode.py --images 160 --resolution 256 --vae tiny --workers 2
    python tools/benchmarks/bench_encode.py --images 24 --resolution 128 --vae sd-arch   # SD-VAE-sized, random weights
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mdt.data.encode import EncodeConfig, encode_dataset
from mdt.data.images import center_crop_adm
from mdt.vae import load_autoencoder

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "imagenet-sample" / "train"

# SD-VAE's architecture (stabilityai/sd-vae-ft-ema config.json), built locally with random weights:
# the same compute per image, nothing downloaded.
SD_VAE_CONFIG = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=256,
)
TINY_VAE_CONFIG = dict(
    block_out_channels=(8, 16, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=64,
)


@dataclass(frozen=True)
class Args:
    data: Path
    images: int
    resolution: int
    vae: str
    workers: int
    batch_size: int
    repeats: int


def parse_args() -> Args:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="ImageFolder root to take images from"
    )
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--vae", default="tiny", help="'tiny', 'sd-arch', or a local VAE folder")
    parser.add_argument(
        "--workers", type=int, default=2, help="DataLoader workers of the 'with workers' runs"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    ns = parser.parse_args()
    return Args(ns.data, ns.images, ns.resolution, ns.vae, ns.workers, ns.batch_size, ns.repeats)


def build_vae(spec: str, folder: Path) -> str:
    if spec not in ("tiny", "sd-arch"):
        return spec
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(**(TINY_VAE_CONFIG if spec == "tiny" else SD_VAE_CONFIG)).save_pretrained(folder)
    return str(folder)


def link_subset(source: Path, target: Path, count: int) -> list[Path]:
    """An ImageFolder of `count` images (one per class, sorted), as symlinks; read once to warm the cache."""
    files = []
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        first = min(class_dir.iterdir())
        (target / class_dir.name).mkdir(parents=True)
        (target / class_dir.name / first.name).symlink_to(first.resolve())
        files.append(first)
        first.read_bytes()
        if len(files) == count:
            break
    return files


class PlainImageFolder(Dataset):
    """What reference repos do: PIL open, ADM crop, ToTensor, Normalize to [-1, 1]."""

    def __init__(self, files: list[Path], resolution: int):
        from torchvision import transforms

        self.files = files
        self.transform = transforms.Compose(
            [
                transforms.Lambda(lambda image: center_crop_adm(image, resolution)),
                transforms.ToTensor(),
                transforms.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5], inplace=True),
            ]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as image:
            return self.transform(image.convert("RGB"))


def plain_loop(files: list[Path], vae_spec: str, args: Args, workers: int, out: Path) -> float:
    ae = load_autoencoder(vae_spec, device="cpu")
    loader = DataLoader(
        PlainImageFolder(files, args.resolution), batch_size=args.batch_size, num_workers=workers
    )
    out.mkdir(parents=True)
    start = time.perf_counter()
    index = 0
    for x in loader:
        with torch.no_grad():
            z = ae.module.encode(x).latent_dist.sample().mul_(ae.scaling_factor)
        for latent in z.numpy():
            np.save(out / f"{index}.npy", latent)
            index += 1
    return time.perf_counter() - start


def mdt_encode(image_root: Path, vae_spec: str, args: Args, workers: int, out: Path) -> float:
    start = time.perf_counter()
    encode_dataset(
        EncodeConfig(
            input=str(image_root),
            out=str(out),
            resolution=args.resolution,
            vae=vae_spec,
            shard_size=100,
            batch_size=args.batch_size,
            workers=workers,
            progress=False,
        )
    )
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-encode-") as tmp:
        tmp_path = Path(tmp)
        vae_spec = build_vae(args.vae, tmp_path / "vae")
        files = link_subset(args.data, tmp_path / "images", args.images)
        n = len(files)
        configs = {
            ("plain-loop", 0): lambda out: plain_loop(files, vae_spec, args, 0, out),
            ("mdt-encode", 0): lambda out: mdt_encode(tmp_path / "images", vae_spec, args, 0, out),
            ("plain-loop", args.workers): lambda out: plain_loop(files, vae_spec, args, args.workers, out),
            ("mdt-encode", args.workers): lambda out: mdt_encode(
                tmp_path / "images", vae_spec, args, args.workers, out
            ),
        }
        best: dict[tuple[str, int], float] = {}
        for repeat in range(args.repeats):
            for (name, workers), run in configs.items():
                out = tmp_path / f"out-{name}-{workers}-{repeat}"
                seconds = run(out)
                shutil.rmtree(out)
                best[(name, workers)] = min(seconds, best.get((name, workers), float("inf")))
        common = {"bench": "encode", "vae": args.vae, "resolution": args.resolution, "images": n,
                  "batch_size": args.batch_size, "torch_threads": torch.get_num_threads()}  # fmt: skip
        for (name, workers), seconds in best.items():
            print(json.dumps({**common, "config": name, "workers": workers, "seconds": round(seconds, 3),
                              "images_per_s": round(n / seconds, 2)}))  # fmt: skip
        ratios = [
            ("mdt-encode/plain-loop", 0, best[("plain-loop", 0)] / best[("mdt-encode", 0)]),
            ("mdt-encode/plain-loop", args.workers, best[("plain-loop", args.workers)] / best[("mdt-encode", args.workers)]),
            (f"mdt-encode(workers={args.workers})/plain-loop(workers=0)", None,
             best[("plain-loop", 0)] / best[("mdt-encode", args.workers)]),
        ]  # fmt: skip
        for name, workers, ratio in ratios:
            figure = {**common, "ratio": name, "speedup": round(ratio, 3)}
            if workers is not None:
                figure["workers"] = workers
            print(json.dumps(figure))


if __name__ == "__main__":
    main()
