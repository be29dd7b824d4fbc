"""The `mdt` command line: parses and validates arguments, then calls the library.

Every command lives here as a thin wrapper; the work is done in the `mdt.*` modules so that a
library user can do the same from Python. A `UserError` anywhere below becomes one line on stderr
and exit status 2.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import typer

from mdt.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help=__doc__.splitlines()[0])


@app.callback()
def root() -> None:
    """mdt: train and sample masked latent diffusion transformers (MDT, MDTv2, MaskDiT, DiT)."""


@app.command("models")
def models_command() -> None:
    """List the model names `--model` accepts, with parameters and forward GFLOPs per 256px image."""
    from mdt.models import list_models
    from mdt.models.stats import model_stats

    typer.echo(f"{'model':16s} {'params':>10s} {'GFLOPs':>8s}")
    for name in list_models():
        stats = model_stats(name)
        typer.echo(f"{name:16s} {stats.params / 1e6:9.1f}M {stats.forward_flops / 1e9:8.1f}")


@app.command("train")
def train_command(
    data: str = typer.Option(None, help="latent dataset folder written by `mdt encode`"),
    model: str = typer.Option(None, help="model preset, e.g. MDTv2-XL/2 (see `mdt models`)"),
    out: str = typer.Option(None, help="run folder to create"),
    config: Path = typer.Option(None, help="recipe YAML (pipelines/*.yaml); flags override its train: section"),
    deepspeed: bool = typer.Option(True, "--deepspeed", help="train through DeepSpeed (the only engine; accepted "
                                   "so DeepSpeed-style launch lines work)"),
    deepspeed_config: str = typer.Option(None, help="ZeRO config JSON, e.g. deepspeed_configs/zero2.json"),
    steps: int = typer.Option(None, help="optimizer steps to train to"),
    micro_batch: int = typer.Option(None, help="samples per rank per micro-step"),
    grad_accum: int = typer.Option(None, help="micro-steps per optimizer step"),
    lr: float = typer.Option(None, help="peak learning rate (AdamW)"),
    ckpt_every: int = typer.Option(None, help="checkpoint every K steps"),
    val_every: int = typer.Option(None, help="validation loss every K steps (needs val_shards)"),
    val_shards: int = typer.Option(None, help="hold out the last N shards for validation"),
    log_every: int = typer.Option(None, help="log every K steps"),
    seed: int = typer.Option(None, help="seed of weights, data order and noise"),
    precision: str = typer.Option(None, help="auto | fp32 | bf16"),
    num_workers: int = typer.Option(None, help="data loader workers per rank"),
    resume: str = typer.Option(None, help="continue the run in this folder from its latest checkpoint"),
    init_from: str = typer.Option(None, help="start from a run/checkpoint/export's weights (unmask tuning)"),
    mask_schedule: str = typer.Option(None, help="unmask tuning: none | zero | cosine"),
    tensorboard: bool = typer.Option(None, "--tensorboard/--no-tensorboard", help="also log to RUN/tensorboard"),
    set_: list[str] = typer.Option([], "--set", help="any other setting, key=value (e.g. objective.mask_ratio=0.4)"),
    local_rank: int = typer.Option(None, "--local_rank", "--local-rank", hidden=True),
) -> None:
    """Train a model on latent shards with DeepSpeed (single process, torchrun or the deepspeed launcher)."""
    from mdt.train import TrainingError, resolve_config, train
    from mdt.train.loop import load_run_config

    overrides = dict(data=data, model=model, out=out, deepspeed_config=deepspeed_config, steps=steps,
                     micro_batch=micro_batch, grad_accum=grad_accum, lr=lr, ckpt_every=ckpt_every,
                     val_every=val_every, val_shards=val_shards, log_every=log_every, seed=seed,
                     precision=precision, num_workers=num_workers, init_from=init_from,
                     mask_schedule=mask_schedule, tensorboard=tensorboard)
    for item in set_:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r} must look like key=value")
        overrides[key] = value
    base = None
    if resume:
        base = load_run_config(Path(resume))
        overrides["out"] = resume
    cfg = resolve_config(config, overrides, base=base)
    try:
        result = train(cfg, resume=bool(resume))
    except TrainingError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(3) from err
    if result.interrupted_by:
        raise typer.Exit(128 + getattr(signal, result.interrupted_by, signal.SIGTERM).value)


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
