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

from mdt.distributed import print0
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


@app.command("sample")
def sample_command(
    ckpt: Path = typer.Option(..., help="Training run folder (uses RUN/ema) or EMA export folder."),
    out: Path = typer.Option(..., help="Output folder: {i:06d}.png, samples.npz, grid.png, sample_config.json."),
    num_samples: int = typer.Option(50_000, help="Samples 0..N-1 to have in --out (existing ones are kept)."),
    sampler: str = typer.Option("ddpm", help="ddpm (ancestral, learned variance) | ddim | dpm++."),
    steps: int | None = typer.Option(None, help="Sampling steps; default 250 ddpm, 50 ddim, 25 dpm++."),
    cfg_scale: float = typer.Option(1.5, help="Classifier-free guidance scale w; 1 disables guidance."),
    cfg_schedule: str = typer.Option("constant", help="constant | power-cosine (MDT: w_t ramps from 1 to w)."),
    cfg_power: float = typer.Option(4.0, help="Exponent s of the power-cosine schedule."),
    cfg_channels: int | None = typer.Option(
        None, help="Guide only the first N latent channels (3 reproduces DiT/MDT); default all."
    ),
    classes: str = typer.Option("random", help="random | balanced | comma list of class indices, e.g. 207,980."),
    seed: int = typer.Option(0, help="Sample i depends only on (seed, i)."),
    batch_size: int = typer.Option(32, help="Samples per forward pass on each process."),
    vae: str | None = typer.Option(None, help="Override the VAE recorded in the checkpoint's data manifest."),
    precision: str = typer.Option("fp32", help="fp32 | bf16 | fp16 autocast for the model."),
    device: str | None = typer.Option(None, help="Torch device; default cuda:LOCAL_RANK if available, else cpu."),
) -> None:
    """Sample images from a checkpoint, guided, on one or many processes (torchrun)."""
    from mdt.sample.guidance import GuidanceConfig
    from mdt.sample.run import SampleConfig, run_sampling

    if cfg_schedule not in ("constant", "power-cosine"):
        raise UserError(f"--cfg-schedule {cfg_schedule!r} is unknown; choose constant or power-cosine.")
    guidance = GuidanceConfig(scale=cfg_scale, schedule=cfg_schedule, power=cfg_power, channels=cfg_channels)
    result = run_sampling(
        SampleConfig(
            ckpt=ckpt, out=out, num_samples=num_samples, sampler=sampler, steps=steps, guidance=guidance,
            classes=classes, seed=seed, batch_size=batch_size, vae=vae, precision=precision, device=device,
        )
    )
    print0(
        f"{result.num_samples} samples in {result.out} ({result.generated} new, "
        f"{result.images_per_second:.2f} images/s)"
    )


@app.command("fid")
def fid_command(
    samples: Path = typer.Option(..., help="Folder of sample images or an ADM-style samples.npz."),
    ref: Path = typer.Option(..., help="Reference statistics .npz (mdt fid-ref) or a folder of reference images."),
    num: int | None = typer.Option(None, help="Use the first N samples; refuse if there are fewer. Default: all."),
    out: Path | None = typer.Option(None, help="Where to write metrics.json; default beside the samples."),
    inception: Path | None = typer.Option(None, help="Inception TorchScript; default clean-fid's cached copy."),
    cache_dir: Path | None = typer.Option(None, help="Cache for statistics of reference folders."),
    batch_size: int = typer.Option(64, help="Images per feature batch."),
    workers: int = typer.Option(4, help="Image decoding/resizing worker processes."),
    device: str | None = typer.Option(None, help="Torch device for the feature network."),
) -> None:
    """FID and KID of samples against a reference, with clean-fid's "clean" features."""
    from mdt.eval.fid import FeatureOptions, evaluate

    opts = FeatureOptions(inception=inception, device=device, batch_size=batch_size, num_workers=workers)
    metrics = evaluate(samples, ref, num=num, out=out, opts=opts, cache_dir=cache_dir)
    kid = "n/a (reference has no features)" if metrics["kid"] is None else f"{metrics['kid']:.6f}"
    typer.echo(f"FID {metrics['fid']:.4f}  KID {kid}  ({metrics['num_samples']} samples, {metrics['resolution']} px)")


@app.command("fid-ref")
def fid_ref_command(
    images: Path = typer.Argument(..., help="Folder of reference images (searched recursively)."),
    out: Path = typer.Option(..., help="Statistics file to write (.npz: mu, sigma, feats, meta)."),
    resolution: int = typer.Option(256, help="ADM center crop size; use the resolution of the samples."),
    num: int | None = typer.Option(None, help="Use the first N images (sorted); default all."),
    inception: Path | None = typer.Option(None, help="Inception TorchScript; default clean-fid's cached copy."),
    batch_size: int = typer.Option(64, help="Images per feature batch."),
    workers: int = typer.Option(4, help="Image decoding/resizing worker processes."),
    device: str | None = typer.Option(None, help="Torch device for the feature network."),
) -> None:
    """Reference statistics of an image folder for `mdt fid --ref`."""
    from mdt.eval.fid import FeatureOptions, make_reference

    opts = FeatureOptions(inception=inception, device=device, batch_size=batch_size, num_workers=workers)
    stats = make_reference(images, out, resolution, num=num, opts=opts)
    typer.echo(f"wrote {out} ({stats.meta['num_images']} images, {resolution} px)")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except UserError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
