"""Checks before training: the data fits the model, the weights come from the same autoencoder, a
resume keeps the settings it was trained with; and the model config and shard split they imply."""

from __future__ import annotations

import dataclasses
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


def check_resume_settings(run: RunDir, cfg: TrainConfig) -> None:
    # The same check resolve_config makes for the CLI, for callers of train() that built cfg themselves.
    check_unchanged(cfg, load_run_config(run.root))


def fit_global_batch(cfg: TrainConfig, run: RunDir | None, record: dict, world: int) -> TrainConfig:
    """`cfg` with the grad_accum that makes its global batch on `world` ranks: on --resume (`run`) the
    checkpoint's global batch, else `global_batch` when set (else `cfg` as it is).

    A resume on another world size keeps the global batch and micro_batch and derives grad_accum; a
    micro_batch or grad_accum asked for is honoured if the sizes still multiply to the global batch.
    """
    recorded = load_run_config(run.root) if run is not None else dataclasses.asdict(TrainConfig())
    micro_before, accum_before = int(recorded["micro_batch"]), int(recorded.get("grad_accum", 1))
    if run is not None:
        global_batch = int(record.get("global_batch", micro_before * accum_before * record.get("world_size", world)))
    elif cfg.global_batch:
        global_batch, micro_before = cfg.global_batch, cfg.micro_batch
    else:
        return cfg
    micro = cfg.micro_batch
    accum = cfg.grad_accum if cfg.grad_accum != accum_before else global_batch // (micro * world)
    if micro * accum * world == global_batch:
        return dataclasses.replace(cfg, grad_accum=accum)
    # What would work: the recorded micro-batch on another number of processes, or another micro-batch here.
    worlds = [w for w in range(1, global_batch // micro_before + 1) if global_batch % (micro_before * w) == 0]
    micros = [m for m in range(1, global_batch // world + 1) if global_batch % (m * world) == 0]
    fixes = [f"launch {' or '.join(map(str, worlds))} processes with micro-batch {micro_before}"] if worlds else []
    if micros:
        fixes.append(f"keep {world} and pass --micro-batch {' or '.join(map(str, micros))}")
    where = f"--resume {run.root}: the run trains" if run is not None else "global_batch: the run trains"
    raise UserError(f"{where} with a global batch of {global_batch} samples, which {world} processes cannot make "
                    f"from micro-batches of {micro} x grad_accum {accum}; {', or '.join(fixes)} (leave "
                    "--grad-accum out: mdt derives it)")


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
