"""The `mdt` command line: parses and validates arguments, then calls the library.

Every command lives here as a thin wrapper; the work is done in the `mdt.*` modules so that a
library user can do the same from Python. A `UserError` anywhere below becomes one line on stderr
and exit status 2.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import click
import typer
from typer.core import TyperGroup

from mdt.cli_checkpoints import export_command, import_command
from mdt.cli_common import RECIPE_HELP, command_flags, command_settings, setting
from mdt.cli_eval import fid_command, fid_ref_command
from mdt.cli_recipe import recipe_command
from mdt.data.encode import EncodeConfig
from mdt.data.shapes import ShapesConfig
from mdt.distributed import print0
from mdt.errors import UserError
from mdt.sample.config import SampleConfig
from mdt.train.config import TrainConfig


class _Commands(TyperGroup):
    """The root group: a UserError from any command becomes one line on stderr and exit status 2. Here rather
    than in main(), so a command run in process (typer's CliRunner, the tests) behaves as from the shell."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help=__doc__.splitlines()[0],
                  context_settings={"max_content_width": 120})  # option help beside the flag, not in a narrow column


@app.callback()
def root(
    # The DeepSpeed launcher puts --local_rank=N before the subcommand (`mdt.cli --local_rank=1 train ...`);
    # it also sets LOCAL_RANK, which is what the library reads, so the flag is accepted and ignored.
    local_rank: int = typer.Option(None, "--local_rank", "--local-rank", hidden=True),
) -> None:
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
    ctx: typer.Context,
    data: str = setting(TrainConfig, "data", "latent dataset folder written by `mdt encode`"),
    model: str = setting(TrainConfig, "model", "model preset, e.g. MDTv2-XL/2 (see `mdt models`)"),
    out: str = setting(TrainConfig, "out", "run folder to create"),
    config: Path = typer.Option(None, help="recipe YAML (pipelines/*.yaml); flags override its train: section"),
    deepspeed: bool = typer.Option(True, "--deepspeed", help="train through DeepSpeed (the only engine; accepted "
                                   "so DeepSpeed-style launch lines work)"),
    deepspeed_config: str = setting(TrainConfig, "deepspeed_config", "ZeRO config JSON"),
    steps: int = setting(TrainConfig, "steps", "optimizer steps to train to"),
    max_wall_seconds: float = setting(TrainConfig, "max_wall_seconds", "stop (and checkpoint) at the first step at "
                                      "which the run's training time reached this many seconds; 0: no budget"),
    micro_batch: int = setting(TrainConfig, "micro_batch", "samples per rank per micro-step"),
    grad_accum: int = setting(TrainConfig, "grad_accum", "micro-steps per optimizer step"),
    global_batch: int = setting(TrainConfig, "global_batch", "samples per optimizer step over all ranks; set, "
                                "grad_accum follows from it on any number of processes (0: micro x accum x ranks)"),
    lr: float = setting(TrainConfig, "lr", "peak learning rate"),
    ckpt_every: int = setting(TrainConfig, "ckpt_every", "checkpoint every K steps"),
    val_every: int = setting(TrainConfig, "val_every", "validation loss every K steps (needs val_shards)"),
    val_shards: int = setting(TrainConfig, "val_shards", "hold out the last N shards for validation"),
    log_every: int = setting(TrainConfig, "log_every", "log every K steps"),
    seed: int = setting(TrainConfig, "seed", "seed of weights, data order and noise"),
    precision: str = setting(TrainConfig, "precision", "fp32 | tf32 | amp-bf16 | amp-fp16 | bf16 | auto "
                             "(mdt.precision)"),
    num_workers: int = setting(TrainConfig, "num_workers", "data loader workers per rank"),
    resume: str = typer.Option(None, help="continue the run in this folder from its latest checkpoint"),
    init_from: str = setting(TrainConfig, "init_from", "start from a run/checkpoint/export's weights (unmask "
                             "tuning)"),
    mask_schedule: str = setting(TrainConfig, "mask_schedule", "unmask tuning: none | zero | cosine"),
    tensorboard: bool = setting(TrainConfig, "tensorboard", "also log to RUN/tensorboard",
                                "--tensorboard/--no-tensorboard"),
    compile: bool = setting(TrainConfig, "compile", "torch.compile the model (default: on CUDA yes, on the CPU no)",
                            "--compile/--no-compile"),
    progress: bool = setting(TrainConfig, "progress", "show a progress bar (rank 0)", "--progress/--no-progress"),
    set_: list[str] = typer.Option([], "--set", help="any other setting, key=value (e.g. objective.mask_ratio=0.4)"),
    local_rank: int = typer.Option(None, "--local_rank", "--local-rank", hidden=True),
) -> None:
    """Train a model on latent shards with DeepSpeed (single process, torchrun or the deepspeed launcher)."""
    from mdt.train import TrainingError, resolve_config, train
    from mdt.train.run_dir import load_run_config

    base = load_run_config(Path(resume)) if resume else None
    flags = {**command_flags(ctx), **({"out": resume} if resume else {})}
    cfg = resolve_config(config, flags, base=base, sets=set_)
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
    ctx: typer.Context,
    input: str = setting(EncodeConfig, "input", "ImageFolder root (ROOT/<class>/<image>), tar shards "
                         "('imgs-{000..009}.tar') or a file listing tars.", argument=True),
    out: str = setting(EncodeConfig, "out", "Output folder for the latent shards and manifest.json.", argument=True),
    config: Path = typer.Option(None, help=RECIPE_HELP + " (encode:)"),
    resolution: int = setting(EncodeConfig, "resolution", "Image side after the ADM center crop; a multiple of 8."),
    vae: str = setting(EncodeConfig, "vae", "Hub id, local diffusers folder, .safetensors or LDM .pth file "
                       "(MaskDiT's autoencoder_kl.pth), or 'pixel'."),
    vae_config: str = setting(EncodeConfig, "vae_config", "Folder with the config.json for a single .safetensors "
                              "--vae (default: the file's folder)."),
    shard_size: int = setting(EncodeConfig, "shard_size", "Images per output shard."),
    flip: bool = setting(EncodeConfig, "flip", "Also encode the horizontal flip of every image.", "--flip/--no-flip"),
    batch_size: int = setting(EncodeConfig, "batch_size", "Images per VAE call."),
    workers: int = setting(EncodeConfig, "workers", "DataLoader workers decoding images (default: cores per rank - 1)."),
    class_list: str = setting(EncodeConfig, "class_list", "Text file with one class name per line, in label order."),
    device: str = setting(EncodeConfig, "device", "Torch device (default: this rank's GPU, else CPU)."),
    progress: bool = setting(EncodeConfig, "progress", "Show a progress bar per rank.", "--progress/--no-progress"),
) -> None:
    """Encode images into WebDataset shards of VAE latents (resumable; run under torchrun for many GPUs)."""
    from mdt.data.encode import encode_dataset

    encode_dataset(command_settings(ctx, EncodeConfig, "encode"))


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
    ctx: typer.Context,
    ckpt: Path = setting(SampleConfig, "ckpt", "Training run folder (uses RUN/ema) or EMA export folder."),
    out: Path = setting(SampleConfig, "out", "Output folder: {i:06d}.png, samples.npz, grid.png, sample_config.json."),
    config: Path = typer.Option(None, help=RECIPE_HELP + " (sample:)"),
    num_samples: int = setting(SampleConfig, "num_samples", "Samples 0..N-1 to have in --out (existing ones are "
                               "kept)."),
    sampler: str = setting(SampleConfig, "sampler", "ddpm (ancestral, learned variance) | ddim | dpm++; edm-heun for "
                           "EDM models (MaskDiT); maskdm-ddim for pixel models (MaskDM's eval.py DDIM)."),
    steps: int = setting(SampleConfig, "steps", "Sampling steps; default 250 ddpm, 50 ddim, 25 dpm++, 40 edm-heun, "
                         "250 maskdm-ddim."),
    eta: float = setting(SampleConfig, "eta", "DDIM's eta (0 = deterministic); default 0 for ddim, 1 for "
                         "maskdm-ddim."),
    churn: float = setting(SampleConfig, "churn", "edm-heun: EDM's S_churn (0 = deterministic; EDM's ImageNet "
                           "S_min/max/noise)."),
    clip_x0: bool = setting(SampleConfig, "clip_x0", "ddpm/ddim: clamp the predicted x0 to [-1, 1] (ADM's "
                            "clip_denoised); default on for pixel data, off for latents.", "--clip-x0/--no-clip-x0"),
    spacing: str = setting(SampleConfig, "spacing", "Which timesteps: even (ADM's 'N', DiT/MDT) | ddim (ADM's "
                           "'ddimN' stride) | linspace (MaskDM's); default linspace for maskdm-ddim, else even."),
    cfg_scale: float = setting(SampleConfig, "cfg_scale", "Classifier-free guidance scale w; 1 disables guidance."),
    cfg_schedule: str = setting(SampleConfig, "cfg_schedule", "constant | power-cosine (MDT: w_t ramps from 1 to w)."),
    cfg_power: float = setting(SampleConfig, "cfg_power", "Exponent s of the power-cosine schedule."),
    cfg_channels: int = setting(SampleConfig, "cfg_channels", "Guide only the first N latent channels (3 reproduces "
                                "DiT/MDT); default all."),
    classes: str = setting(SampleConfig, "classes", "random | balanced | comma list of class indices, e.g. 207,980."),
    seed: int = setting(SampleConfig, "seed", "Sample i depends only on (seed, i)."),
    batch_size: int = setting(SampleConfig, "batch_size", "Samples per forward pass on each process."),
    vae: str = setting(SampleConfig, "vae", "Override the VAE recorded in the checkpoint's data manifest."),
    precision: str = setting(SampleConfig, "precision", "fp32 | tf32 | amp-bf16 | amp-fp16 (bf16 = amp-bf16 here)"),
    device: str = setting(SampleConfig, "device", "Torch device; default cuda:LOCAL_RANK if available, else cpu."),
    compile: bool = setting(SampleConfig, "compile", "torch.compile the model (default: on CUDA yes, on the CPU no)",
                            "--compile/--no-compile"),
    progress: bool = setting(SampleConfig, "progress", "Show a progress bar (rank 0).", "--progress/--no-progress"),
) -> None:
    """Sample images from a checkpoint, guided, on one or many processes (torchrun)."""
    from mdt.sample.run import run_sampling

    result = run_sampling(command_settings(ctx, SampleConfig, "sample"))
    print0(
        f"{result.num_samples} samples in {result.out} ({result.generated} new, "
        f"{result.images_per_second:.2f} images/s)"
    )


@app.command("shapes")
def shapes_command(
    ctx: typer.Context,
    out: Path = setting(ShapesConfig, "out", "Folder to write OUT/train/<class>/*.png and OUT/val/<class>/*.png into.",
                        argument=True),
    config: Path = typer.Option(None, help=RECIPE_HELP + " (shapes:)"),
    size: int = setting(ShapesConfig, "size", "Image side in pixels."),
    train_per_class: int = setting(ShapesConfig, "train_per_class", "Training images per class."),
    val_per_class: int = setting(ShapesConfig, "val_per_class", "Held-out images per class (classifier and FID "
                                 "reference)."),
    seed: int = setting(ShapesConfig, "seed", "Image (split, class, i) depends only on this seed."),
) -> None:
    """Draw the built-in class-conditional dataset (coloured shapes): data for the demo, no download."""
    from mdt.data.shapes import SHAPE_CLASSES, write_shapes_dataset

    settings = command_settings(ctx, ShapesConfig, "shapes")
    counts = write_shapes_dataset(settings)
    typer.echo(f"{settings.out}: {counts['train']} train and {counts['val']} val images of {len(SHAPE_CLASSES)} "
               "classes")


classifier_app = typer.Typer(no_args_is_help=True,
                             help="A small classifier probe: are generated samples of the class they were asked for?")
app.add_typer(classifier_app, name="classifier")


@classifier_app.command("train")
def classifier_train_command(
    images: Path = typer.Argument(..., help="Training images, ROOT/<class>/<image> (the ones the model trained on)."),
    out: Path = typer.Option(..., help="Folder for classifier.safetensors and classifier.json."),
    val: Path | None = typer.Option(None, help="Held-out images of the same classes, for the real-image accuracy."),
    epochs: int = typer.Option(6, help="Passes over the training images."),
    seed: int = typer.Option(0, help="Seed of weights and data order."),
) -> None:
    """Train the probe classifier on real images."""
    from mdt.eval.classifier import train_classifier

    summary = train_classifier(images, val, out, epochs=epochs, seed=seed)
    val_text = "n/a" if summary["val_accuracy"] is None else f"{summary['val_accuracy']:.3f}"
    typer.echo(f"{out}: {len(summary['class_names'])} classes, held-out accuracy {val_text} "
               f"({summary['train_seconds']} s)")


@classifier_app.command("score")
def classifier_score_command(
    samples: Path = typer.Option(..., help="The --out folder of `mdt sample` (or its samples.npz)."),
    classifier: Path = typer.Option(..., help="Folder written by `mdt classifier train`."),
    out: Path | None = typer.Option(None, help="metrics.json to add the class accuracy to; default beside the samples."),
) -> None:
    """Fraction of samples the probe assigns to the class they were generated for."""
    from mdt.eval.classifier import score_samples
    from mdt.eval.fid import default_metrics_path
    from mdt.fileio import merge_json

    metrics = score_samples(classifier, samples)
    merge_json(out or default_metrics_path(samples), metrics)
    typer.echo(f"class accuracy {metrics['class_accuracy']:.3f} on {metrics['num_samples_scored']} samples "
               f"(real held-out images: {metrics['classifier_val_accuracy']}, chance {metrics['chance_accuracy']:.3f})")


@app.command("plot")
def plot_command(
    run: Path = typer.Argument(..., help="Training run folder (or its metrics.jsonl)."),
    out: Path | None = typer.Option(None, help="PNG to write; default RUN/loss.png."),
    summary: Path | None = typer.Option(None, help="Also add the run's training summary to this metrics.json."),
) -> None:
    """Training and validation loss against steps and wall-clock, as a PNG."""
    from mdt.eval.plots import plot_losses
    from mdt.fileio import check_mergeable, merge_json, read_json_object

    folder = run if run.is_dir() else run.parent
    target = out or folder / "loss.png"
    run_summary = folder / "metrics.json"
    if summary is not None:  # both read first, so a refusal leaves no plot behind
        if not run_summary.is_file():
            raise UserError(f"{run_summary} does not exist; the run has not finished, so there is no summary yet")
        train_summary = read_json_object(run_summary, "drop --summary, or restore the file")
        check_mergeable(summary)
    info = plot_losses(run, target)
    if summary is not None:
        merge_json(summary, {"train": train_summary})
    typer.echo(f"wrote {target} ({info['train_points']} training and {info['val_points']} validation points)")


@app.command("side-by-side")
def side_by_side_command(
    real: Path = typer.Option(..., help="Real images, ROOT/<class>/<image> (e.g. the held-out ones)."),
    samples: Path = typer.Option(..., help="The --out folder of `mdt sample` (or its samples.npz)."),
    out: Path = typer.Option(..., help="PNG to write."),
    per_class: int = typer.Option(8, help="Images per row."),
) -> None:
    """Real images beside samples: per class, a row of real images and a row of samples, as a PNG."""
    from mdt.eval.side_by_side import write_side_by_side

    info = write_side_by_side(real, samples, out, per_class=per_class)
    typer.echo(f"wrote {out} ({info['classes']} classes, {info['per_class']} real images and samples each)")


app.command("recipe")(recipe_command)
app.command("fid")(fid_command)
app.command("fid-ref")(fid_ref_command)
app.command("import")(import_command)
app.command("export")(export_command)


def main() -> None:
    """Console-script entry point. SIGTERM/SIGINT stop any command cleanly with 128 + the signal
    (`mdt train` checkpoints first); see mdt.preemption."""
    from mdt.preemption import Interrupted, interrupt_on_stop_signals

    try:
        with interrupt_on_stop_signals():
            app()
    except UserError as err:  # one raised before a command runs (while its arguments are parsed)
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except Interrupted as stop:
        typer.echo(f"mdt: {stop}; finished files are kept, partial ones removed: run the same command again "
                   "to complete the work", err=True)
        sys.exit(stop.exit_code)


if __name__ == "__main__":
    main()
