"""Checks before training: the data fits the model, the weights come from the same autoencoder, a
resume keeps the settings it was trained with; and the model config and shard split they imply."""

from __future__ import annotations

from pathlib import Path

from mdt.data.manifest import Manifest
from mdt.errors import UserError
from mdt.models import ModelConfig, model_config, read_model_config
from mdt.train.config import TrainConfig, check_unchanged
from mdt.train.run_dir import RunDir, load_run_config


def check_data_matches_model(manifest: Manifest, cfg: ModelConfig) -> None:
    c, h, w = manifest.latent_shape
    if (c, h, w) != (cfg.in_channels, cfg.input_size, cfg.input_size):
        raise UserError(
            f"model {cfg.name} expects {cfg.in_channels}x{cfg.input_size}x{cfg.input_size} latents but "
            f"{manifest.root} holds {c}x{h}x{w} (resolution {manifest.resolution}); encode at the model's "
            f"resolution or set model_options.input_size={h} (and in_channels={c}) for a new model")
    if cfg.num_classes and manifest.num_classes != cfg.num_classes:  # 0: unconditional, labels unused
        raise UserError(
            f"model {cfg.name} has {cfg.num_classes} classes but {manifest.root} has {manifest.num_classes}; "
            f"set model_options.num_classes={manifest.num_classes} for a new model or use matching data")


def check_same_autoencoder(recorded: dict, manifest: Manifest, source: Path) -> None:
    """The weights in `source` were trained on data `recorded`: the same autoencoder, then the same
    latent shape (another resolution through the same VAE is named as such)."""
    vae = recorded.get("vae", {})
    mine = {"kind": manifest.vae_kind, "scaling_factor": manifest.scaling_factor}
    theirs = {"kind": vae.get("kind"), "scaling_factor": vae.get("scaling_factor")}
    if mine != theirs:
        raise UserError(f"{source} was trained on latents from another autoencoder ({theirs}) than {manifest.root} "
                        f"({mine}); train on data encoded with the same VAE")
    shape = recorded.get("latent_shape")
    if shape != list(manifest.latent_shape):
        raise UserError(
            f"{source} was trained at resolution {recorded.get('resolution')} ({'x'.join(map(str, shape or []))} "
            f"latents) but {manifest.root} holds resolution {manifest.resolution} "
            f"({'x'.join(map(str, manifest.latent_shape))}); encode the data at resolution "
            f"{recorded.get('resolution')}, or start a new run at resolution {manifest.resolution}")


def check_resume_settings(run: RunDir, cfg: TrainConfig, recorded_world: int | None, world: int) -> None:
    # The same check resolve_config makes for the CLI, for callers of train() that built cfg themselves.
    check_unchanged(cfg, load_run_config(run.root))
    if recorded_world is not None and recorded_world != world:
        raise UserError(f"--resume {run.root}: the run was trained on {recorded_world} processes and this launch "
                        f"has {world}; the optimizer's ZeRO partitions and the data split depend on it: launch "
                        f"{recorded_world} processes, or start a new run with --init-from {run.root}")


def build_model_config(cfg: TrainConfig, manifest: Manifest, init_dir: Path | None) -> ModelConfig:
    if init_dir is not None:
        return read_model_config(init_dir)
    c, h, w = manifest.latent_shape
    options = {"in_channels": c, "num_classes": manifest.num_classes, **cfg.model_options}
    try:
        model_cfg = model_config(cfg.model, **options)
    except ValueError as err:
        raise UserError(f"--model {cfg.model}: {err}") from err
    # A preset is built for one latent size: another one must be asked for, never picked up from the data.
    if "input_size" not in cfg.model_options and model_cfg.input_size != h:
        raise UserError(
            f"--model {cfg.model} is a preset for {model_cfg.input_size}x{model_cfg.input_size} latents but "
            f"{manifest.root} holds {c}x{h}x{w} (resolution {manifest.resolution}); set model_options.input_size={h} "
            f"(--set model_options.input_size={h} or the recipe's train: model_options) to train the model at "
            f"this size, or encode at the preset's resolution")
    return model_cfg


def split_shards(manifest: Manifest, val_shards: int) -> tuple[list[str], list[str]]:
    names = [s.name for s in manifest.shards if s.count > 0]
    if val_shards >= len(names):
        raise UserError(f"val_shards={val_shards} leaves no training data: {manifest.root} has {len(names)} shards; "
                        "hold out fewer")
    cut = len(names) - val_shards
    return names[:cut], names[cut:]
