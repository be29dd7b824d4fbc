"""The `mdt` command line: parses and validates arguments, then calls the library.

Every command lives here as a thin wrapper; the work is done in the `mdt.*` modules so that a
library user can do the same from Python. A `UserError` anywhere below becomes one line on stderr
and exit status 2.
"""

from __future__ import annotations

import sys

import typer

from mdt.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])


@app.callback()
def root() -> None:
    """mdt: train and sample masked latent diffusion transformers (MDT, MDTv2, MaskDiT, DiT)."""


@app.command("models")
def models_command() -> None:
    """List the model names `--model` accepts, with their parameter counts."""
    from mdt.models import create_model, list_models

    for name in list_models():
        model = create_model(name)
        params = sum(p.numel() for p in model.parameters())
        typer.echo(f"{name:16s} {params / 1e6:9.2f}M")


data_app = typer.Typer(
    no_args_is_help=True, help="Inspect and check latent datasets written by `mdt encode`."
)
app.add_typer(data_app, name="data")


@app.command("encode")
def encode_command(
    input: str = typer.Argument(
        ...,
        help="ImageFolder root (ROOT/<class>/<image>), tar shards ('imgs-{000..009}.tar') or a file listing tars.",
    ),
    out: str = typer.Argument(..., help="Output folder for the latent shards and manifest.json."),
    resolution: int = typer.Option(256, help="Image side after the ADM center crop; a multiple of 8."),
    vae: str = typer.Option(
        "stabilityai/sd-vae-ft-ema", help="Hub id, local diffusers folder, .safetensors file, or 'pixel'."
    ),
    vae_config: str | None = typer.Option(
        None, help="Folder with the config.json for a single .safetensors --vae (default: the file's folder)."
    ),
    shard_size: int = typer.Option(1000, help="Images per output shard."),
    flip: bool = typer.Option(False, "--flip", help="Also encode the horizontal flip of every image."),
    batch_size: int = typer.Option(32, help="Images per VAE call."),
    workers: int | None = typer.Option(
        None, help="DataLoader workers decoding images (default: cores per rank - 1)."
    ),
    class_list: str | None = typer.Option(
        None, help="Text file with one class name per line, in label order."
    ),
    device: str | None = typer.Option(None, help="Torch device (default: this rank's GPU, else CPU)."),
    progress: bool = typer.Option(True, help="Show a progress bar per rank."),
) -> None:
    """Encode images into WebDataset shards of VAE latents (resumable; run under torchrun for many GPUs)."""
    from mdt.data.encode import EncodeConfig, encode_dataset

    config = EncodeConfig(
        input=input,
        output=out,
        resolution=resolution,
        vae=vae,
        vae_config=vae_config,
        shard_size=shard_size,
        flip=flip,
        batch_size=batch_size,
        workers=workers,
        class_list=class_list,
        device=device,
        progress=progress,
    )
    encode_dataset(config)


@data_app.command("verify")
def data_verify_command(
    data_dir: str = typer.Argument(..., help="A folder written by `mdt encode`."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Re-read every shard and check counts, shapes, dtypes and labels against manifest.json."""
    from mdt.data.verify import verify_dataset

    report = verify_dataset(data_dir, progress=progress)
    for problem in report.problems:
        typer.echo(f"bad: {problem}", err=True)
    if not report.ok:
        typer.echo(
            f"{data_dir}: {len(report.problems)} problem(s); re-run `mdt encode` to rewrite bad shards.",
            err=True,
        )
        raise typer.Exit(1)
    typer.echo(f"{data_dir}: ok, {report.samples_checked} samples in {len(report.manifest.shards)} shards")


@data_app.command("info")
def data_info_command(data_dir: str = typer.Argument(..., help="A folder written by `mdt encode`.")) -> None:
    """Summarise a latent dataset from its manifest."""
    from mdt.data.verify import dataset_info

    typer.echo(dataset_info(data_dir))


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except UserError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
