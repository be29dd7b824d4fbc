"""The training loop: latent shards + a model preset -> a run folder with checkpoints and logs.

One program for one CPU process and for many GPU nodes: DeepSpeed (mdt.train.engine) does the
distribution. Each step's randomness (timesteps, noise, class dropout, masks) comes from a generator
seeded by (seed, step, micro-batch, rank) and the data stream is a pure function of the batch index,
so a resumed run repeats exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from mdt import distributed
from mdt.compiling import maybe_compile
from mdt.data.manifest import Manifest, read_manifest
from mdt.data.reader import LatentLoader, iter_validation_batches
from mdt.diffusion import diffusion_from_dict, make_objective
from mdt.errors import UserError
from mdt.fileio import write_json
from mdt.locking import exclusive_folder
from mdt.models import ModelConfig, build_model, model_config, read_model_config
from mdt.precision import resolve_auto, set_tf32
from mdt.preemption import StopRequest
from mdt.train.config import TrainConfig
from mdt.train.ema import EMA
from mdt.train.engine import Engine, init_process_group, resolve_deepspeed_config
from mdt.train.metrics_log import MetricsLog
from mdt.train.optimizer import build_optimizer
from mdt.train.run_dir import (
    RunDir,
    read_weights,
    replace_folder,
    resolve_init_source,
    tag_for,
    write_export,
)
from mdt.train.schedules import lr_multiplier, unmask_ratio

VALIDATION_SEED = 20240601  # fixed: every run and model is validated on the same noise
# Settings that fix which batches each step sees: a resume with other values would silently train on
# another stream than the uninterrupted run (the loader worker count does not matter).
STREAM_SETTINGS = ("micro_batch", "grad_accum", "seed")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became non-finite); the last good checkpoint remains."""


@dataclass
class TrainResult:
    step: int
    interrupted_by: str | None  # signal name when stopped early by SIGTERM/SIGINT
    reached_budget: bool = False  # stopped before `steps` because training time reached max_wall_seconds


def _mix(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


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


@torch.no_grad()
def validation_loss(engine: Engine, objective: Any, data: str, shards: list[str], batch_size: int,
                    num_batches: int) -> dict[str, float]:
    """The objective's plain loss (no mask, no class dropout) at fixed timesteps or sigmas and fixed
    noise. Every rank evaluates the same batches (ZeRO-3 needs all ranks in each forward)."""
    totals: dict[str, float] = {}
    count = 0
    for index, batch in enumerate(iter_validation_batches(data, batch_size, VALIDATION_SEED, shards=shards)):
        if index == num_batches:
            break
        x0 = batch["latents"].to(engine.device)
        b = x0.shape[0]
        sample_ids = torch.arange(count, count + b)
        gen = torch.Generator().manual_seed(_mix(VALIDATION_SEED, index))
        terms = objective.validation_terms(engine, x0, batch["labels"].to(engine.device), sample_ids, gen)
        for name, value in terms.items():
            totals[name] = totals.get(name, 0.0) + value.sum().item()
        count += b
    if count == 0:
        raise UserError(f"the validation shards {shards} of {data} hold no samples")
    parts = {f"val_{k}": v / count for k, v in totals.items()}
    parts["val_loss"] = sum(parts.values())
    return parts


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def train(cfg: TrainConfig, *, resume: bool = False) -> TrainResult:
    """Train into `cfg.out` (or continue it, with `resume`); one writer per run folder."""
    init_process_group()
    run = RunDir(Path(cfg.out))
    with exclusive_folder(run.root, "--resume" if resume else "--out"):
        return _train(cfg, run, resume)


def check_resume_settings(run: RunDir, cfg: TrainConfig, recorded_world: int | None, world: int) -> None:
    saved = load_run_config(run.root)
    for key in STREAM_SETTINGS:
        if key in saved and saved[key] != getattr(cfg, key):
            raise UserError(f"--resume {run.root}: {key} is {getattr(cfg, key)} but the run was trained with "
                            f"{saved[key]}, so the batches after the resume point would differ from the "
                            f"uninterrupted run's; resume with {key}={saved[key]}, or start a new run with "
                            f"--init-from {run.root}")
    if recorded_world is not None and recorded_world != world:
        raise UserError(f"--resume {run.root}: the run was trained on {recorded_world} processes and this launch "
                        f"has {world}; the optimizer's ZeRO partitions and the data split depend on it: launch "
                        f"{recorded_world} processes, or start a new run with --init-from {run.root}")


def _train(cfg: TrainConfig, run: RunDir, resume: bool) -> TrainResult:
    rank, world = distributed.get_rank(), distributed.get_world_size()
    manifest = read_manifest(cfg.data)
    latest = None
    if resume:
        tag, step, skipped = run.resumable()
        for problem in skipped:
            distributed.print0(f"mdt train: skipping an incomplete checkpoint: {problem}")
        if skipped:
            distributed.print0(f"mdt train: resuming from {tag}, the newest whole checkpoint")
        latest = (tag, step)
        record = run.latest_record() or {}
        check_resume_settings(run, cfg, record.get("world_size"), world)
    elif run.latest() is not None:
        raise UserError(f"{run.root} already holds a run; pass --resume {run.root} to continue it, "
                        "or choose another --out")

    init_weights_dir = init_ema_dir = None
    if resume:
        check_same_autoencoder(_read_json(run.data_manifest), manifest, run.root)
        model_cfg = read_model_config(run.checkpoints / latest[0] / "ema")
    else:
        if cfg.init_from:
            init_weights_dir, init_ema_dir = resolve_init_source(cfg.init_from)
            recorded = init_ema_dir / "data_manifest.json"
            if recorded.is_file():
                check_same_autoencoder(_read_json(recorded), manifest, init_ema_dir)
            else:  # an imported official checkpoint: its VAE is not on record
                distributed.print0(f"mdt train: {init_ema_dir} records no data manifest (an imported checkpoint); "
                                   f"{manifest.root} must be encoded with the VAE it was trained with")
        model_cfg = build_model_config(cfg, manifest, init_weights_dir)
    check_data_matches_model(manifest, model_cfg)
    train_shards, val_shards = split_shards(manifest, cfg.val_shards)

    torch.manual_seed(cfg.seed)  # weight init: identical on every rank
    model = build_model(model_cfg)
    if init_weights_dir is not None:
        model.load_state_dict(read_weights(init_weights_dir))
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    compiled = maybe_compile(model, cfg.compile, distributed.default_device())
    try:  # DDPM or EDM: the recipe's `diffusion:` section, else the family's formulation
        diffusion = diffusion_from_dict({**cfg.diffusion, "learn_sigma": model_cfg.learn_sigma},
                                        family=model_cfg.family)
        objective = make_objective(model_cfg.family, diffusion=diffusion, num_classes=model_cfg.num_classes,
                                   grid_size=model_cfg.grid_size, patch_size=model_cfg.patch_size,
                                   learn_sigma=model_cfg.learn_sigma, **cfg.objective)
    except ValueError as err:
        raise UserError(f"{model_cfg.name} with diffusion settings {cfg.diffusion or '{}'}: {err}") from None
    except TypeError as err:
        raise UserError(f"objective settings {cfg.objective} do not fit the {model_cfg.family} objective: {err}") from err
    base_mask_ratio = getattr(objective, "mask_ratio", 0.0)
    if cfg.mask_schedule != "none" and not hasattr(objective, "mask_ratio"):
        raise UserError(f"--mask-schedule {cfg.mask_schedule} needs a masked model; {model_cfg.name} has no mask")

    precision = resolve_auto(cfg.precision)
    set_tf32(precision)
    optimizer = build_optimizer(model.parameters(), cfg.optimizer_config(), cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(cfg.lr_schedule, cfg.warmup_steps, cfg.steps, cfg.min_lr / cfg.lr))
    ds_config = resolve_deepspeed_config(cfg.deepspeed_config, micro_batch=cfg.micro_batch,
                                         grad_accum=cfg.grad_accum, world_size=world, grad_clip=cfg.grad_clip,
                                         precision=cfg.precision)
    # DeepSpeed ZeRO refuses client optimizers it has not tested (Adan) without this; Adan's state is
    # partitioned, saved and resharded like Adam's (checked on ZeRO-1/2/3 with a 2-rank save and load).
    ds_config["zero_allow_untested_optimizer"] = cfg.optimizer["name"] != "adamw"
    engine = Engine(model, optimizer, scheduler, ds_config)

    start_step, prior_seconds = 0, 0.0
    if resume:
        client_state = engine.load(run.checkpoints, latest[0])
        start_step = int(client_state["step"])
        prior_seconds = float(client_state.get("train_seconds", 0.0))  # 0 for checkpoints older than the budget
    ema = EMA(engine.master_partitions(), cfg.ema_decay, **cfg.ema_warmup)
    ema_source = run.checkpoints / latest[0] / "ema" if resume else (
        init_weights_dir if cfg.init_ema == "weights" else init_ema_dir)
    if ema_source is not None:
        engine.scatter_full_params(read_weights(ema_source), into=ema.shadow)

    data_manifest = manifest.to_dict()
    if distributed.is_main():
        run.root.mkdir(parents=True, exist_ok=True)
        cfg.save(run.config)
        write_json(run.data_manifest, data_manifest)
    global_batch = cfg.micro_batch * cfg.grad_accum * world
    distributed.print0(
        f"mdt train: {model_cfg.name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) on "
        f"{manifest.root} [{len(train_shards)} train / {len(val_shards)} val shards], world size {world}, "
        f"global batch {global_batch} = micro {cfg.micro_batch} x accum {cfg.grad_accum} x {world} ranks, "
        f"ZeRO-{engine.zero_stage}, {cfg.optimizer['name']}, {precision}, "
        f"{'compiled' if compiled else 'eager'}{', activation checkpointing' * cfg.activation_checkpointing}, "
        f"steps {start_step} -> {cfg.steps}")

    def save(step: int, clock: float) -> None:
        tag = tag_for(step)
        try:
            engine.save(run.checkpoints, tag, {"step": step, "train_seconds": clock})
            weights = engine.full_fp32_params()  # collective under ZeRO: all ranks gather, rank 0 writes
            with engine.masters_replaced_by(ema.shadow):
                ema_weights = engine.full_fp32_params()
            if distributed.is_main():
                folder = run.checkpoints / tag
                write_export(folder / "ema", model, ema_weights, diffusion.to_dict(), data_manifest)
                write_export(folder / "weights", model, weights, diffusion.to_dict(), data_manifest)
            distributed.barrier()  # every rank's optimizer partition is on disk
            if distributed.is_main():
                run.record_files(tag)
                run.mark_latest(tag, step, world)
                replace_folder(folder / "ema", run.ema)
                run.prune(cfg.keep_last)
        except OSError as err:  # a full disk, a lost mount, no permission: stop, the previous one stays
            previous = run.latest()
            if distributed.is_main():
                shutil.rmtree(run.checkpoints / tag, ignore_errors=True)  # free what the partial save took
            raise TrainingError(f"writing checkpoint {tag} into {run.checkpoints} failed ({err}); "
                                f"{'the checkpoint ' + previous[0] if previous else 'no earlier checkpoint'} stays "
                                f"in charge; free space or fix the folder, then --resume {run.root}") from err
        distributed.barrier()

    log = MetricsLog(run.metrics, resume_step=start_step if resume else None,
                     tensorboard_dir=run.root / "tensorboard" if cfg.tensorboard else None)
    # Pinned batches copy to a GPU without making the host wait for it.
    on_gpu = engine.device.type == "cuda"
    stop = StopRequest()  # from here a signal means: finish the step, checkpoint, exit 143
    loader = iter(LatentLoader(cfg.data, cfg.micro_batch, seed=cfg.seed, num_workers=cfg.num_workers,
                               start_batch=start_step * cfg.grad_accum, shards=train_shards, pin_memory=on_gpu))
    tokens_per_image = model_cfg.num_tokens
    window: dict[str, float] = {}
    window_steps, window_time = 0, 0.0
    wall_start = time.perf_counter()

    def elapsed() -> float:
        """Training time of the run: this process's loop plus what the resumed checkpoint recorded."""
        return prior_seconds + time.perf_counter() - wall_start

    clock = prior_seconds  # the run's one clock: the slowest rank's reading, agreed once per step

    budget = float(cfg.max_wall_seconds)
    reached_budget = bool(budget) and prior_seconds >= budget  # same on every rank: read from the checkpoint
    if reached_budget:
        distributed.print0(f"mdt train: the run's training time {prior_seconds:.1f} s already reached "
                           f"max_wall_seconds={budget:g} at step {start_step}; nothing to train (raise "
                           f"--max-wall-seconds to go on)")
    step = start_step
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not distributed.is_main(), desc="train", unit="step",
               dynamic_ncols=True)
    try:
        while step < cfg.steps and not reached_budget:
            if hasattr(objective, "mask_ratio"):
                objective.mask_ratio = unmask_ratio(cfg.mask_schedule, base_mask_ratio, step / cfg.steps)
            step_start = time.perf_counter()
            step_parts: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                batch = next(loader)
                gen = torch.Generator(device=engine.device).manual_seed(_mix(cfg.seed, step, micro, rank))
                latents = batch["latents"].to(engine.device, non_blocking=on_gpu)
                labels = batch["labels"].to(engine.device, non_blocking=on_gpu)
                out = objective(engine, latents, labels, gen)
                engine.backward_and_step(out.loss)  # DeepSpeed divides by grad_accum itself
                # The loss and its parts in one read: each read of a GPU value makes the host wait.
                values = torch.stack([out.loss.detach().float(), *(v.float() for v in out.parts.values())]).tolist()
                for name, value in zip(["loss", *out.parts], values, strict=True):
                    step_parts[name] = step_parts.get(name, 0.0) + value / cfg.grad_accum
            ema.update(engine.master_partitions(), step)
            step += 1
            step_time = time.perf_counter() - step_start

            # Every rank learns of a non-finite loss or a stop signal (its number) on any rank, and all take
            # the slowest rank's clock as the run's: the budget test, the log and the checkpoint then read
            # one value, and every rank stops after the same step.
            flags = torch.tensor([float(not math.isfinite(step_parts["loss"])), float(stop.signum), elapsed()],
                                 dtype=torch.float64, device=engine.device)
            if distributed.is_initialized():
                torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            if flags[0] > 0:
                raise TrainingError(f"the loss became non-finite at step {step} (on at least one rank); the last good "
                                    f"checkpoint is kept in {run.checkpoints}; lower --lr or check the data")
            clock = float(flags[2])
            reached_budget = budget > 0 and clock >= budget
            last = step == cfg.steps or reached_budget  # log, validate and checkpoint as at the end of a run

            for name, value in step_parts.items():
                window[name] = window.get(name, 0.0) + value
            window_steps += 1
            window_time += step_time
            if step % cfg.log_every == 0 or last:
                images_per_s = global_batch * window_steps / window_time
                record = {"step": step, **{k: v / window_steps for k, v in window.items()}, "lr": engine.lr(),
                          "grad_norm": engine.grad_norm(), "images_per_s": images_per_s,
                          "tokens_per_s": images_per_s * tokens_per_image, "step_time_s": window_time / window_steps,
                          "peak_memory_gb": peak_memory_gb(engine.device),
                          "wall_time_s": clock}
                if hasattr(objective, "mask_ratio"):
                    record["mask_ratio"] = objective.mask_ratio
                if engine.loss_scale() is not None:
                    record["loss_scale"] = engine.loss_scale()
                log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{images_per_s:.1f}")
                window, window_steps, window_time = {}, 0, 0.0
            bar.update(1)

            if cfg.val_every and (step % cfg.val_every == 0 or last):
                val = validation_loss(engine, objective, cfg.data, val_shards, cfg.micro_batch, cfg.val_batches)
                log.write({"step": step, **val, "wall_time_s": clock})
            if flags[1] > 0:
                save(step, clock)
                name = signal.Signals(int(flags[1])).name
                distributed.print0(f"mdt train: stopped by {name} at step {step}; checkpoint saved, resume with "
                                   f"--resume {run.root}")
                return TrainResult(step, name)
            if step % cfg.ckpt_every == 0 or last:
                save(step, clock)
            if reached_budget:
                distributed.print0(f"mdt train: stopped on the budget at step {step}: training time {clock:.1f} s "
                                   f"reached max_wall_seconds={budget:g}; checkpoint saved")
    finally:
        bar.close()
        log.close()
        stop.restore()
    if distributed.is_main():
        summary = summarize(run.metrics, global_batch, clock)
        summary.update(stopped_by="max_wall_seconds" if reached_budget else "steps", stop_step=step,
                       max_wall_seconds=budget)
        write_json(run.root / "metrics.json", summary)
    distributed.print0(f"mdt train: done at step {step}; EMA weights in {run.ema}")
    return TrainResult(step, None, reached_budget)


def summarize(metrics_path: Path, global_batch: int, seconds: float) -> dict:
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train_records = [r for r in records if "loss" in r]
    val_records = [r for r in records if "val_loss" in r]
    summary = {"global_batch": global_batch, "wall_time_s": seconds}
    if train_records:
        last = train_records[-1]
        summary.update(final_step=last["step"], final_loss=last["loss"],
                       mean_images_per_s=sum(r["images_per_s"] for r in train_records) / len(train_records))
    if val_records:
        summary.update(final_val_loss=val_records[-1]["val_loss"],
                       best_val_loss=min(r["val_loss"] for r in val_records))
    return summary


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path} does not exist; the folder is not a complete mdt run or export")
    return json.loads(path.read_text())


def load_run_config(run: Path) -> dict:
    path = RunDir(run).config
    if not path.is_file():
        raise UserError(f"--resume {run}: {path} does not exist; is this a run folder written by mdt train?")
    return yaml.safe_load(path.read_text())
