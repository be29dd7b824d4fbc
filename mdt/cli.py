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

from mdt.cli_checkpoints import export_command, import_command
from mdt.cli_common import RECIPE_HELP, require, with_recipe
from mdt.cli_eval import fid_command, fid_ref_command
from mdt.cli_recipe import recipe_command
from mdt.distributed import print0
from mdt.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"max_content_width": 120},  # option help beside the flag, not in a narrow column
                  help=__doc__.splitlines()[0])


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
    data: str = typer.Option(None, help="latent dataset folder written by `mdt encode`"),
    model: str = typer.Option(None, help="model preset, e.g. MDTv2-XL/2 (see `mdt models`)"),
    out: str = typer.Option(None, help="run folder to create"),
    config: Path = typer.Option(None, help="recipe YAML (pipelines/*.yaml); flags override its train: section"),
    deepspeed: bool = typer.Option(True, "--deepspeed", help="train through DeepSpeed (the only engine; accepted "
                                   "so DeepSpeed-style launch lines work)"),
    deepspeed_config: str = typer.Option(None, help="ZeRO config JSON, e.g. deepspeed_configs/zero2.json"),
    steps: int = typer.Option(None, help="optimizer steps to train to"),
    max_wall_seconds: float = typer.Option(None, help="stop (and checkpoint) at the first step at which the run's "
                                           "training time reached this many seconds; 0: no budget"),
    micro_batch: int = typer.Option(None, help="samples per rank per micro-step"),
    grad_accum: int = typer.Option(None, help="micro-steps per optimizer step"),
    lr: float = typer.Option(None, help="peak learning rate"),
    ckpt_every: int = typer.Option(None, help="checkpoint every K steps"),
    val_every: int = typer.Option(None, help="validation loss every K steps (needs val_shards)"),
    val_shards: int = typer.Option(None, help="hold out the last N shards for validation"),
    log_every: int = typer.Option(None, help="log every K steps"),
    seed: int = typer.Option(None, help="seed of weights, data order and noise"),
    precision: str = typer.Option(None, help="fp32 | tf32 | amp-bf16 | amp-fp16 | bf16 | auto (mdt.precision)"),
    num_workers: int = typer.Option(None, help="data loader workers per rank"),
    resume: str = typer.Option(None, help="continue the run in this folder from its latest checkpoint"),
    init_from: str = typer.Option(None, help="start from a run/checkpoint/export's weights (unmask tuning)"),
    mask_schedule: str = typer.Option(None, help="unmask tuning: none | zero | cosine"),
    tensorboard: bool = typer.Option(None, "--tensorboard/--no-tensorboard", help="also log to RUN/tensorboard"),
    compile: bool = typer.Option(None, "--compile/--no-compile", help="torch.compile the model (default: on CUDA "
                                 "yes, on the CPU no)"),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="show a progress bar (rank 0)"),
    set_: list[str] = typer.Option([], "--set", help="any other setting, key=value (e.g. objective.mask_ratio=0.4)"),
    local_rank: int = typer.Option(None, "--local_rank", "--local-rank", hidden=True),
) -> None:
    """Train a model on latent shards with DeepSpeed (single process, torchrun or the deepspeed launcher)."""
    from mdt.train import TrainingError, resolve_config, train
    from mdt.train.run_dir import load_run_config

    # Every option but these is a TrainConfig field of the same name; None: not given on the command line.
    overrides = {k: v for k, v in ctx.params.items() if k not in ("config", "deepspeed", "resume", "set_", "local_rank")}
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
    ctx: typer.Context,
    input: str = typer.Argument(
        None,
        help="ImageFolder root (ROOT/<class>/<image>), tar shards ('imgs-{000..009}.tar') or a file listing tars.",
    ),
    out: str = typer.Argument(None, help="Output folder for the latent shards and manifest.json."),
    config: Path = typer.Option(None, help=RECIPE_HELP + " (encode:)"),
    resolution: int = typer.Option(256, help="Image side after the ADM center crop; a multiple of 8."),
    vae: str = typer.Option(
        "stabilityai/sd-vae-ft-ema", help="Hub id, local diffusers folder, .safetensors or LDM .pth file (MaskDiT's autoencoder_kl.pth), or 'pixel'."
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

    values = with_recipe(ctx, config, "encode")
    require(values, "input", "INPUT", "input images")
    require(values, "out", "OUT", "output folder")
    values["input"], values["output"] = str(values["input"]), str(values.pop("out"))
    encode_dataset(EncodeConfig(**values))


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
    ckpt: Path = typer.Option(None, help="Training run folder (uses RUN/ema) or EMA export folder."),
    out: Path = typer.Option(None, help="Output folder: {i:06d}.png, samples.npz, grid.png, sample_config.json."),
    config: Path = typer.Option(None, help=RECIPE_HELP + " (sample:)"),
    num_samples: int = typer.Option(50_000, help="Samples 0..N-1 to have in --out (existing ones are kept)."),
    sampler: str = typer.Option("ddpm", help="ddpm (ancestral, learned variance) | ddim | dpm++; edm-heun for EDM "
                                             "models (MaskDiT); maskdm-ddim for pixel models (MaskDM's eval.py DDIM)."),
    steps: int | None = typer.Option(None, help="Sampling steps; default 250 ddpm, 50 ddim, 25 dpm++, 40 edm-heun, "
                                                "250 maskdm-ddim."),
    eta: float | None = typer.Option(None, help="DDIM's eta (0 = deterministic); default 0 for ddim, 1 for maskdm-ddim."),
    churn: float = typer.Option(0.0, help="edm-heun: EDM's S_churn (0 = deterministic; EDM's ImageNet S_min/max/noise)."),
    spacing: str | None = typer.Option(None, help="Which timesteps: even (ADM's 'N', DiT/MDT) | ddim (ADM's 'ddimN' "
                                                  "stride) | linspace (MaskDM's); default linspace for maskdm-ddim, "
                                                  "else even."),
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
    precision: str = typer.Option("fp32", help="fp32 | tf32 | amp-bf16 | amp-fp16 (bf16 = amp-bf16 here)"),
    device: str | None = typer.Option(None, help="Torch device; default cuda:LOCAL_RANK if available, else cpu."),
    compile: bool = typer.Option(None, "--compile/--no-compile", help="torch.compile the model (default: on CUDA "
                                 "yes, on the CPU no)"),
) -> None:
    """Sample images from a checkpoint, guided, on one or many processes (torchrun)."""
    from mdt.sample.guidance import GuidanceConfig
    from mdt.sample.run import SampleConfig, run_sampling

    v = with_recipe(ctx, config, "sample")
    require(v, "ckpt", "--ckpt", "checkpoint")
    require(v, "out", "--out", "output folder")
    if v["cfg_schedule"] not in ("constant", "power-cosine"):
        raise UserError(f"--cfg-schedule {v['cfg_schedule']!r} is unknown; choose constant or power-cosine.")
    guidance = GuidanceConfig(scale=float(v["cfg_scale"]), schedule=v["cfg_schedule"], power=float(v["cfg_power"]),
                              channels=v["cfg_channels"])
    if isinstance(v["classes"], list):  # a recipe may list the classes as YAML
        v["classes"] = ",".join(str(c) for c in v["classes"])
    result = run_sampling(
        SampleConfig(
            ckpt=Path(v["ckpt"]), out=Path(v["out"]), num_samples=v["num_samples"], sampler=v["sampler"],
            steps=v["steps"], spacing=v["spacing"], eta=None if v["eta"] is None else float(v["eta"]),
            churn=float(v["churn"]), guidance=guidance, classes=str(v["classes"]), seed=v["seed"],
            batch_size=v["batch_size"], vae=v["vae"], precision=v["precision"], device=v["device"],
            compile=v["compile"],
        )
    )
    print0(
        f"{result.num_samples} samples in {result.out} ({result.generated} new, "
        f"{result.images_per_second:.2f} images/s)"
    )


@app.command("shapes")
def shapes_command(
    ctx: typer.Context,
    out: Path = typer.Argument(None, help="Folder to write OUT/train/<class>/*.png and OUT/val/<class>/*.png into."),
    config: Path = typer.Option(None, help=RECIPE_HELP + " (shapes:)"),
    size: int = typer.Option(16, help="Image side in pixels."),
    train_per_class: int = typer.Option(400, help="Training images per class."),
    val_per_class: int = typer.Option(50, help="Held-out images per class (classifier and FID reference)."),
    seed: int = typer.Option(0, help="Image (split, class, i) depends only on this seed."),
) -> None:
    """Draw the built-in class-conditional dataset (coloured shapes): data for the demo, no download."""
    from mdt.data.shapes import SHAPE_CLASSES, ShapesConfig, write_shapes_dataset

    v = with_recipe(ctx, config, "shapes")
    require(v, "out", "OUT", "output folder")
    counts = write_shapes_dataset(ShapesConfig(out=Path(v["out"]), size=v["size"], seed=v["seed"],
                                               train_per_class=v["train_per_class"],
                                               val_per_class=v["val_per_class"]))
    typer.echo(f"{v['out']}: {counts['train']} train and {counts['val']} val images of {len(SHAPE_CLASSES)} classes")


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
    import json

    from mdt.eval.plots import plot_losses
    from mdt.fileio import merge_json

    folder = run if run.is_dir() else run.parent
    target = out or folder / "loss.png"
    info = plot_losses(run, target)
    if summary is not None:
        run_summary = folder / "metrics.json"
        if not run_summary.is_file():
            raise UserError(f"{run_summary} does not exist; the run has not finished, so there is no summary yet")
        merge_json(summary, {"train": json.loads(run_summary.read_text())})
    typer.echo(f"wrote {target} ({info['train_points']} training and {info['val_points']} validation points)")


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
    except UserError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except Interrupted as stop:
        typer.echo(f"mdt: {stop}; finished files are kept, partial ones removed: run the same command again "
                   "to complete the work", err=True)
        sys.exit(stop.exit_code)


if __name__ == "__main__":
    main()
