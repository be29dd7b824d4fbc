"""The training loop: latent shards + a model preset -> a run folder with checkpoints and logs.

One program for one CPU process and for many GPU nodes: DeepSpeed (mdt.train.engine) does the
distribution. Each sample's randomness (timesteps, noise, class dropout, masks, routes) is keyed by
(seed, step, position in the global batch), never by rank (mdt.draws), and the data stream is a pure
function of the step (mdt.data.reader): a resumed run repeats exactly what an uninterrupted one would
have done, on the same or (mdt.train.elastic) another number of ranks.

`_train` reads in phases: find where the weights come from (`_find_origin`), build the model, objective
and engine (`_set_up`), load the step, clock and EMA to go on from (`_resume`), record the run
(`_record_start`), train (`_train_steps`, checkpointing through a `Checkpointer`) and summarise (`_finish`).
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from mdt import distributed
from mdt.checkpoints.export_folder import MANIFEST_FILE
from mdt.compiling import maybe_compile
from mdt.data.manifest import Manifest, read_manifest
from mdt.data.reader import LatentLoader
from mdt.diffusion import DiffusionConfig, diffusion_from_dict, make_objective
from mdt.errors import UserError
from mdt.fileio import write_json
from mdt.locking import exclusive_folder
from mdt.models import ModelConfig, build_model, read_model_config
from mdt.precision import resolve_auto, set_tf32
from mdt.preemption import StopRequest
from mdt.train.checkpointer import Checkpointer, TrainingError
from mdt.train.checks import (
    build_model_config,
    check_data_matches_model,
    check_resume_settings,
    check_same_autoencoder,
    fit_global_batch,
    split_shards,
)
from mdt.train.clock import RunClock
from mdt.train.config import TrainConfig
from mdt.train.elastic import ELASTIC_DIR, load_elastic_state, read_elastic_record, world_layout_changed
from mdt.train.ema import EMA
from mdt.train.engine import Engine, init_process_group, resolve_deepspeed_config
from mdt.train.metrics_log import MetricsLog
from mdt.train.objective import MaskedObjective, Objective, masked
from mdt.train.optimizer import build_optimizer
from mdt.train.run_dir import RunDir, read_json, read_weights, resolve_init_source
from mdt.train.schedules import lr_multiplier, unmask_ratio
from mdt.train.seeding import step_draws
from mdt.train.validation import validation_loss

__all__ = ["TrainResult", "TrainingError", "summarize", "train"]


@dataclass
class TrainResult:
    step: int
    interrupted_by: str | None  # signal name when stopped early by SIGTERM/SIGINT
    reached_budget: bool = False  # stopped before `steps` because training time reached max_wall_seconds


@dataclass(frozen=True)
class Origin:
    """Where the run starts from: its own newest checkpoint (--resume), another run or export
    (--init-from) or a fresh initialisation; and the model config that implies."""

    model_cfg: ModelConfig
    resume_tag: str | None = None  # the checkpoint to resume from
    weights: Path | None = None  # an export whose weights initialise the model (--init-from)
    ema: Path | None = None  # an export whose weights initialise the EMA (None: the model's own)


@dataclass
class Parts:
    """What the set-up builds, the same on every rank."""

    model_cfg: ModelConfig
    model: torch.nn.Module
    compiled: bool
    diffusion: DiffusionConfig  # DDPM or EDM (its to_dict() is written beside each export)
    objective: Objective
    masked: MaskedObjective | None  # the objective when it masks tokens: its ratio is scheduled and logged
    base_mask_ratio: float
    precision: str
    engine: Engine
    train_shards: list[str]
    val_shards: list[str]
    rank: int
    world: int
    global_batch: int  # micro_batch x grad_accum x world


@dataclass
class Start:
    """What the run goes on from: step 0 and no time spent, or a checkpoint's step and train_seconds."""

    step: int
    clock: RunClock
    ema: EMA


@dataclass
class Window:
    """The step values summed since the last training log record."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    seconds: float = 0.0

    def add(self, values: dict[str, float], seconds: float) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.steps += 1
        self.seconds += seconds


def train(cfg: TrainConfig, *, resume: bool = False) -> TrainResult:
    """Train into `cfg.out` (or continue it, with `resume`); one writer per run folder."""
    init_process_group()
    run = RunDir(Path(cfg.out))
    with exclusive_folder(run.root, "--resume" if resume else "--out"):
        return _train(cfg, run, resume)


def _train(cfg: TrainConfig, run: RunDir, resume: bool) -> TrainResult:
    manifest = read_manifest(cfg.data)
    # The global batch is kept on any world size: the resumed checkpoint's, or global_batch when set.
    record = run.latest_record() if resume else None
    cfg = fit_global_batch(cfg, run if record else None, record or {}, distributed.get_world_size())
    origin = _find_origin(cfg, run, resume, manifest)
    parts = _set_up(cfg, manifest, origin)
    start = _resume(cfg, run, origin, parts)
    data_manifest = manifest.to_dict()
    _record_start(cfg, run, manifest, parts, data_manifest, start.step)
    checkpointer = Checkpointer(parts.engine, run, start.ema, parts.model, parts.diffusion.to_dict(), data_manifest,
                                cfg.keep_last, parts.world, parts.global_batch, start.clock)
    result = _train_steps(cfg, run, parts, checkpointer, start.step, resume)
    if result.interrupted_by is None:
        _finish(cfg, run, parts, result, start.clock)
    return result


def _find_origin(cfg: TrainConfig, run: RunDir, resume: bool, manifest: Manifest) -> Origin:
    """Check the run folder, the settings and the data against where the weights come from."""
    if resume:
        tag, _, skipped = run.resumable()
        for problem in skipped:
            distributed.print0(f"mdt train: skipping an incomplete checkpoint: {problem}")
        if skipped:
            distributed.print0(f"mdt train: resuming from {tag}, the newest whole checkpoint")
        check_resume_settings(run, cfg)
        check_same_autoencoder(read_json(run.data_manifest), manifest, run.root)
        folder = run.checkpoints / tag
        # The model starts from the checkpoint's fp32 weights: exact where DeepSpeed's partitions cannot load.
        origin = Origin(read_model_config(folder / "ema"), resume_tag=tag, ema=folder / "ema",
                        weights=folder / "weights" if (folder / "weights").is_dir() else None)
    elif run.latest() is not None:
        raise UserError(f"{run.root} already holds a run; pass --resume {run.root} to continue it, "
                        "or choose another --out")
    elif cfg.init_from:
        weights, ema = resolve_init_source(cfg.init_from)
        recorded = ema / MANIFEST_FILE
        if recorded.is_file():
            check_same_autoencoder(read_json(recorded), manifest, ema)
        else:  # an imported official checkpoint: its VAE is not on record
            distributed.print0(f"mdt train: {ema} records no data manifest (an imported checkpoint); "
                               f"{manifest.root} must be encoded with the VAE it was trained with")
        origin = Origin(build_model_config(cfg, manifest, weights), weights=weights,
                        ema=weights if cfg.init_ema == "weights" else ema)
    else:
        origin = Origin(build_model_config(cfg, manifest, None))
    check_data_matches_model(manifest, origin.model_cfg)
    return origin


def _set_up(cfg: TrainConfig, manifest: Manifest, origin: Origin) -> Parts:
    """The model (initial or --init-from weights), its objective, the optimizer and the DeepSpeed engine."""
    world = distributed.get_world_size()
    model_cfg = origin.model_cfg
    train_shards, val_shards = split_shards(manifest, cfg.val_shards)
    torch.manual_seed(cfg.seed)  # weight init: identical on every rank
    model = build_model(model_cfg)
    if origin.weights is not None:
        model.load_state_dict(read_weights(origin.weights))
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    compiled = maybe_compile(model, cfg.compile, distributed.default_device())
    diffusion, objective = _make_objective(cfg, model_cfg)
    mask = masked(objective)
    if cfg.mask_schedule != "none" and mask is None:
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
    return Parts(model_cfg, model, compiled, diffusion, objective, mask, mask.mask_ratio if mask else 0.0,
                 precision, engine, train_shards, val_shards, distributed.get_rank(), world,
                 cfg.micro_batch * cfg.grad_accum * world)


def _make_objective(cfg: TrainConfig, model_cfg: ModelConfig) -> tuple[DiffusionConfig, Objective]:
    """DDPM or EDM: the recipe's `diffusion:` section, else the family's formulation; and its objective."""
    try:
        diffusion = diffusion_from_dict({**cfg.diffusion, "learn_sigma": model_cfg.learn_sigma},
                                        family=model_cfg.family)
        objective = make_objective(model_cfg.family, diffusion=diffusion, num_classes=model_cfg.num_classes,
                                   grid_size=model_cfg.grid_size, patch_size=model_cfg.patch_size,
                                   learn_sigma=model_cfg.learn_sigma, routes=len(model_cfg.routes), **cfg.objective)
    except ValueError as err:
        raise UserError(f"{model_cfg.name} with diffusion settings {cfg.diffusion or '{}'}: {err}") from None
    except TypeError as err:
        raise UserError(f"objective settings {cfg.objective} do not fit the {model_cfg.family} objective: {err}") from err
    return diffusion, objective


def _resume(cfg: TrainConfig, run: RunDir, origin: Origin, parts: Parts) -> Start:
    """Load the checkpoint's engine state, step and training time (on --resume), then start the EMA."""
    step, prior_seconds = 0, 0.0
    if origin.resume_tag is not None:
        step, prior_seconds = _load_checkpoint(run, origin, parts)
    engine = parts.engine
    ema = EMA(engine.master_partitions(), cfg.ema_decay, **cfg.ema_warmup)
    if origin.ema is not None:
        engine.scatter_full_params(read_weights(origin.ema), into=ema.shadow)
    return Start(step, RunClock(prior_seconds), ema)


def _load_checkpoint(run: RunDir, origin: Origin, parts: Parts) -> tuple[int, float]:
    """The optimizer state, step and training seconds of the resumed checkpoint: DeepSpeed's partitions when
    the world size and ZeRO stage are the ones that wrote them, else the whole state (mdt.train.elastic)."""
    engine, tag = parts.engine, origin.resume_tag
    folder = run.checkpoints / tag / ELASTIC_DIR
    elastic = read_elastic_record(folder)
    latest = run.latest_record() or {}
    layout = elastic or (latest if latest.get("tag") == tag else {})  # {}: older than the record, try DeepSpeed's
    if not world_layout_changed(layout, parts.world, engine.zero_stage):
        client_state = engine.load(run.checkpoints, tag)
        return int(client_state["step"]), float(client_state.get("train_seconds", 0.0))  # 0: before the budget
    if elastic is None or origin.weights is None:
        raise UserError(f"--resume {run.root}: checkpoint {tag} was written on {layout['world_size']} processes "
                        "before mdt saved optimizer state for any world size; launch "
                        f"{layout['world_size']} processes to resume it, or start a new run with --init-from {run.root}")
    distributed.print0(f"mdt train: resuming {tag} written on {elastic['world_size']} processes (ZeRO-"
                       f"{elastic['zero_stage']}) on {parts.world} (ZeRO-{engine.zero_stage}): loading the whole "
                       f"optimizer state from {folder}")
    engine.set_full_fp32_params(read_weights(origin.weights))
    load_elastic_state(engine, folder, elastic, parts.global_batch)
    return int(elastic["step"]), float(elastic["train_seconds"])


def _record_start(cfg: TrainConfig, run: RunDir, manifest: Manifest, parts: Parts, data_manifest: dict,
                  start_step: int) -> None:
    """Write the run's settings and data manifest, and say what trains on what."""
    if distributed.is_main():
        run.root.mkdir(parents=True, exist_ok=True)
        cfg.save(run.config)
        write_json(run.data_manifest, data_manifest)
    world = parts.world
    routes = "".join(f", TREAD routes {r.start}-{r.end} at {r.ratio:g}" for r in parts.model_cfg.routes)
    distributed.print0(
        f"mdt train: {parts.model_cfg.name} ({sum(p.numel() for p in parts.model.parameters()) / 1e6:.1f}M params"
        f"{routes}) "
        f"on {manifest.root} [{len(parts.train_shards)} train / {len(parts.val_shards)} val shards], world size "
        f"{world}, global batch {parts.global_batch} = micro {cfg.micro_batch} x accum {cfg.grad_accum} x {world} "
        f"ranks, ZeRO-{parts.engine.zero_stage}, {cfg.optimizer['name']}, {parts.precision}, "
        f"{'compiled' if parts.compiled else 'eager'}{', activation checkpointing' * cfg.activation_checkpointing}, "
        f"steps {start_step} -> {cfg.steps}")


def _train_steps(cfg: TrainConfig, run: RunDir, parts: Parts, checkpointer: Checkpointer, start_step: int,
                 resume: bool) -> TrainResult:
    """Steps until `cfg.steps`, the time budget or a stop signal; log, validate and checkpoint on the way."""
    engine, clock = parts.engine, checkpointer.clock
    log = MetricsLog(run.metrics, resume_step=start_step if resume else None,
                     tensorboard_dir=run.root / "tensorboard" if cfg.tensorboard else None)
    # Pinned batches copy to a GPU without making the host wait for it.
    on_gpu = engine.device.type == "cuda"
    stop = StopRequest()  # from here a signal means: finish the step, checkpoint, exit 143
    loader = iter(LatentLoader(cfg.data, cfg.micro_batch, global_batch=parts.global_batch, seed=cfg.seed,
                               num_workers=cfg.num_workers, start_step=start_step, shards=parts.train_shards,
                               pin_memory=on_gpu))
    window = Window()
    clock.start()
    budget = float(cfg.max_wall_seconds)
    reached_budget = clock.spent(budget)  # same on every rank: read from the checkpoint
    if reached_budget:
        distributed.print0(f"mdt train: the run's training time {clock.seconds:.1f} s already reached "
                           f"max_wall_seconds={budget:g} at step {start_step}; nothing to train (raise "
                           f"--max-wall-seconds to go on)")
    step = start_step
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not (cfg.progress and distributed.is_main()), desc="train", unit="step",
               dynamic_ncols=True)
    try:
        while step < cfg.steps and not reached_budget:
            step_parts, step_time = _step(cfg, parts, checkpointer.ema, loader, step, on_gpu)
            step += 1
            # Every rank learns of a non-finite loss or a stop signal on any rank, and all take the slowest
            # rank's clock as the run's: every rank stops after the same step.
            reasons = clock.agree(step_parts["loss"], stop.signum, engine.device)
            if reasons.nonfinite_loss:
                raise TrainingError(f"the loss became non-finite at step {step} (on at least one rank); the last good "
                                    f"checkpoint is kept in {run.checkpoints}; lower --lr or check the data")
            reached_budget = clock.spent(budget)
            last = step == cfg.steps or reached_budget  # log, validate and checkpoint as at the end of a run

            window.add(step_parts, step_time)
            if step % cfg.log_every == 0 or last:
                record = _train_record(step, window, parts, clock.seconds)
                log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
                window = Window()
            bar.update(1)

            if cfg.val_every and (step % cfg.val_every == 0 or last):
                val = validation_loss(engine, parts.objective, cfg.data, parts.val_shards, cfg.micro_batch,
                                      cfg.val_batches)
                log.write({"step": step, **val, "wall_time_s": clock.seconds})
            if reasons.signal_name is not None:
                checkpointer.save(step)
                distributed.print0(f"mdt train: stopped by {reasons.signal_name} at step {step}; checkpoint saved, "
                                   f"resume with --resume {run.root}")
                return TrainResult(step, reasons.signal_name)
            if step % cfg.ckpt_every == 0 or last:
                checkpointer.save(step)
            if reached_budget:
                distributed.print0(f"mdt train: stopped on the budget at step {step}: training time "
                                   f"{clock.seconds:.1f} s reached max_wall_seconds={budget:g}; checkpoint saved")
    finally:
        bar.close()
        log.close()
        stop.restore()
    return TrainResult(step, None, reached_budget)


def _step(cfg: TrainConfig, parts: Parts, ema: EMA, loader, step: int, on_gpu: bool) -> tuple[dict[str, float], float]:
    """One optimizer step (cfg.grad_accum micro-batches) and the EMA update after it: the loss and its
    parts averaged over the micro-batches, and the step's seconds."""
    engine = parts.engine
    if parts.masked is not None:
        parts.masked.mask_ratio = unmask_ratio(cfg.mask_schedule, parts.base_mask_ratio, step / cfg.steps)
    step_start = time.perf_counter()
    step_parts: dict[str, float] = {}
    for micro in range(cfg.grad_accum):
        batch = next(loader)
        gen = step_draws(cfg.seed, step, parts.rank * cfg.grad_accum + micro, cfg.micro_batch, parts.global_batch,
                         engine.device)
        latents = batch["latents"].to(engine.device, non_blocking=on_gpu)
        labels = batch["labels"].to(engine.device, non_blocking=on_gpu)
        out = parts.objective(engine, latents, labels, gen)
        engine.backward_and_step(out.loss)  # DeepSpeed divides by grad_accum itself
        # The loss and its parts in one read: each read of a GPU value makes the host wait.
        values = torch.stack([out.loss.detach().float(), *(v.float() for v in out.parts.values())]).tolist()
        for name, value in zip(["loss", *out.parts], values, strict=True):
            step_parts[name] = step_parts.get(name, 0.0) + value / cfg.grad_accum
    ema.update(engine.master_partitions(), step)
    return step_parts, time.perf_counter() - step_start


def _train_record(step: int, window: Window, parts: Parts, clock_seconds: float) -> dict:
    """The metrics.jsonl record of the steps in `window`: the loss and its parts of the global batch
    (averaged over every rank's micro-batches), so runs on different world sizes compare step by step."""
    engine = parts.engine
    images_per_s = parts.global_batch * window.steps / window.seconds
    means = _mean_over_ranks(window.sums, engine.device)
    record = {"step": step, **{k: v / window.steps for k, v in means.items()}, "lr": engine.lr(),
              "grad_norm": engine.grad_norm(), "images_per_s": images_per_s,
              "tokens_per_s": images_per_s * parts.model_cfg.num_tokens, "step_time_s": window.seconds / window.steps,
              "peak_memory_gb": peak_memory_gb(engine.device),
              "wall_time_s": clock_seconds}
    if parts.masked is not None:
        record["mask_ratio"] = parts.masked.mask_ratio
    if (scale := engine.loss_scale()) is not None:
        record["loss_scale"] = scale
    return record


def _mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Collective: each value averaged over the ranks (every rank logs at the same steps)."""
    if not distributed.is_initialized() or distributed.get_world_size() == 1:
        return values
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return dict(zip(values, (tensor / distributed.get_world_size()).tolist(), strict=True))


def _finish(cfg: TrainConfig, run: RunDir, parts: Parts, result: TrainResult, clock: RunClock) -> None:
    """Summarise the run in metrics.json (rank 0) and say where its EMA weights are."""
    if distributed.is_main():
        summary = summarize(run.metrics, parts.global_batch, clock.seconds)
        summary.update(stopped_by="max_wall_seconds" if result.reached_budget else "steps", stop_step=result.step,
                       max_wall_seconds=float(cfg.max_wall_seconds))
        write_json(run.root / "metrics.json", summary)
    distributed.print0(f"mdt train: done at step {result.step}; EMA weights in {run.ema}")


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


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
