"""`mdt import` and `mdt export`: checkpoints in and out of other code bases (thin wrappers)."""

from __future__ import annotations

from pathlib import Path

import typer

from mdt.errors import UserError


def import_command(
    src: Path = typer.Argument(..., help="Official DiT/MDT/MDTv2/MaskDiT/MaskDM checkpoint (.pt, .safetensors) or a "
                                         "diffusers DiT folder (DiTTransformer2DModel, or a pipeline with transformer/)."),
    out: Path = typer.Argument(..., help="New export folder to write (model.safetensors, model_config.json, ...)."),
    model: str = typer.Option(..., help="Preset (DiT-XL/2, MDT-XL/2, MDTv2-XL/2, MaskDiT-XL/2) or a family (DiT, MDT, "
                                        "MDTv2, MaskDiT, UViT); supplies what no tensor holds, e.g. DiT's heads."),
    input_size: int | None = typer.Option(None, help="Check: the latent size the checkpoint must have."),
    num_classes: int | None = typer.Option(None, help="Check: the number of classes the checkpoint must have."),
    set_: list[str] = typer.Option([], "--set", help="Model option key=value, e.g. num_heads=16 or decoder_depth=2."),
    trust_pickle: bool = typer.Option(False, help="Allow full unpickling (runs code from the file): trusted files only."),
) -> None:
    """Import an official or diffusers checkpoint as an mdt export (sample with it, or --init-from it)."""
    from mdt.checkpoints.export_folder import read_checkpoint
    from mdt.checkpoints.import_diffusion import describe
    from mdt.checkpoints.importing import import_checkpoint
    from mdt.diffusion.edm import EDMConfig

    config = import_checkpoint(src, out, model=model, sets=set_, input_size=input_size, num_classes=num_classes,
                               trust_pickle=trust_pickle)
    diffusion = read_checkpoint(out).diffusion  # read back as mdt sample will read it
    sampler = " --sampler edm-heun" if isinstance(diffusion, EDMConfig) else ""
    typer.echo(f"wrote {out}: {config.name} ({config.family}, depth {config.depth}, width {config.hidden_size}, "
               f"{config.num_heads} heads, {config.input_size}x{config.input_size}x{config.in_channels} latents, "
               f"{config.num_classes} classes; {describe(diffusion)}); sample with "
               f"`mdt sample --ckpt {out} --vae <VAE>{sampler}`")


def export_command(
    src: Path = typer.Argument(..., help="Training run folder (uses RUN/ema) or an export folder."),
    out: Path = typer.Argument(..., help="New folder to write."),
    format: str = typer.Option("diffusers", help="diffusers: a DiTPipeline folder (DiT models only)."),
    vae: str | None = typer.Option(None, help="VAE to put in the pipeline; default the one the run's data used."),
) -> None:
    """Export a DiT as a diffusers DiTPipeline folder (transformer, scheduler, VAE)."""
    from mdt.checkpoints.diffusers_export import export_diffusers_pipeline

    if format != "diffusers":
        raise UserError(f"--format {format!r} is unknown; mdt export writes 'diffusers'")
    export_diffusers_pipeline(src, out, vae=vae)
    typer.echo(f"wrote {out}: load it with pipe = diffusers.DiTPipeline.from_pretrained({str(out)!r}), then "
               "mdt.models.diffusers_dit.match_original_dit(pipe.transformer) for DiT's exact timestep features")
