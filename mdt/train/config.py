"""Training configuration: the fields of a run, their checks, and what a resume may change."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mdt.errors import UserError
from mdt.precision import PRECISIONS
from mdt.settings import apply_settings, parse_value, resolve_settings
from mdt.train.optimizer import OptimizerConfig

LR_SCHEDULES = ("constant", "cosine")
MASK_SCHEDULES = ("none", "zero", "cosine")
INIT_EMA = ("ema", "weights")
# Settings of runs made before the optimizer section, read as its keys (an old run resumes as it was).
OLD_NAMES = {"adam_betas": "optimizer.betas", "weight_decay": "optimizer.weight_decay"}
# ema_pytorch's warm-up (MaskDM): decay 0 (a copy) up to update_after_step, then
# 1 - (1 + k / inv_gamma) ** -power at k steps after it, capped at ema_decay.
EMA_WARMUP_KEYS = ("update_after_step", "inv_gamma", "power")
# What a resume may change: how long, where and how the run is logged and executed, never what it computes
# (micro_batch and grad_accum only as far as the global batch stays: mdt.train.checks.fit_global_batch).
RESUME_CHANGEABLE = ("steps", "max_wall_seconds", "out", "data", "num_workers", "ckpt_every", "keep_last",
                     "micro_batch", "grad_accum",
                     "log_every", "val_every", "val_batches", "tensorboard", "compile", "activation_checkpointing",
                     "deepspeed_config", "init_from", "progress")
DEFAULT_BETAS = {"adamw": (0.9, 0.999), "adan": (0.98, 0.92, 0.99)}  # sail-sg/Adan's and MDTv2's betas


@dataclass
class TrainConfig:
    """Every setting of a training run; written to RUN/config.yaml before the first step."""

    data: str = ""
    out: str = ""
    model: str = "DiT-S/2"
    model_options: dict[str, Any] = field(default_factory=dict)  # overrides of the preset (e.g. input_size)
    objective: dict[str, Any] = field(default_factory=dict)  # mask_ratio, mae_weight, min_snr_gamma, ...
    diffusion: dict[str, Any] = field(default_factory=dict)  # ScheduleConfig fields
    steps: int = 1000
    # Wall-clock budget in seconds (0 = none): the run stops at the end of the first optimizer step at
    # which its training time reached it, checkpointed as at the end of a run. Training time is the
    # clock of the log's wall_time_s: from the start of the first step, validation and checkpoint writes
    # inside the loop included, process start, model build, DeepSpeed init and checkpoint loading not.
    # On --resume the clock goes on from the seconds the checkpoint recorded: the budget is the run's
    # total, like steps, so a preempted run spends only what is left (raise it on --resume to go on).
    max_wall_seconds: float = 0.0
    micro_batch: int = 32
    grad_accum: int = 1
    # Samples per optimizer step over all ranks (the papers' "batch size"). 0: micro_batch x grad_accum x
    # the number of processes. Set, grad_accum is derived from it on each launch, so the run trains the
    # same on 1 GPU or 64, and a resume on another number of processes keeps it (mdt.train.elastic).
    global_batch: int = 0
    lr: float = 1e-4
    # name (adamw | adan), betas (two for adamw, three for adan), eps, weight_decay; keys left out take
    # the optimizer's defaults (mdt.train.optimizer.OptimizerConfig).
    optimizer: dict[str, Any] = field(default_factory=dict)
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    min_lr: float = 0.0
    grad_clip: float = 0.0  # global gradient-norm clip; 0 = none (DiT, MDT, MaskDiT do not clip)
    ema_decay: float = 0.9999
    ema_warmup: dict[str, Any] = field(default_factory=dict)  # EMA_WARMUP_KEYS; empty: constant decay
    ckpt_every: int = 1000
    keep_last: int = 2
    val_every: int = 0
    val_shards: int = 0  # the last N shards of the data are held out for validation
    val_batches: int = 4
    log_every: int = 10
    seed: int = 0
    num_workers: int = 2
    deepspeed_config: str = "deepspeed_configs/zero2.json"
    precision: str = "auto"
    mask_schedule: str = "none"  # unmask tuning: "zero" or "cosine" decay of the mask ratio
    init_from: str | None = None
    init_ema: str = "ema"  # with init_from: the EMA starts from its EMA, or from its online weights (MaskDM)
    tensorboard: bool = False
    compile: bool | None = None  # torch.compile the model; None: on CUDA yes, on the CPU no
    activation_checkpointing: bool = False  # recompute block activations in backward (24-40 GB cards)
    progress: bool = True  # a progress bar on rank 0

    def validate(self) -> None:
        if isinstance(self.compile, str):  # `--set compile=true`, or `compile: auto` in a recipe
            self.compile = None if self.compile == "auto" else parse_value("compile", self.compile)
        if not self.data:
            raise UserError("no training data given; pass --data LATENTS (a folder written by `mdt encode`)")
        if not self.out:
            raise UserError("no run folder given; pass --out RUN")
        for section in ("optimizer", "ema_warmup", "model_options", "objective", "diffusion"):
            if not isinstance(getattr(self, section), dict):
                raise UserError(f"{section} must be a section of key: value settings, not "
                                f"{getattr(self, section)!r} (set one key with --set {section}.KEY=VALUE)")
        checks = [
            (self.steps > 0, "steps must be positive"),
            (isinstance(self.max_wall_seconds, (int, float)) and not isinstance(self.max_wall_seconds, bool)
             and self.max_wall_seconds >= 0, "max_wall_seconds must be 0 (no budget) or a positive number of seconds"),
            (self.micro_batch > 0, "micro_batch must be positive"),
            (self.grad_accum > 0, "grad_accum must be positive"),
            (self.global_batch >= 0, "global_batch must be 0 (micro_batch x grad_accum x processes) or positive"),
            (self.lr > 0, "lr must be positive"),
            (0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1)"),
            (self.ckpt_every > 0, "ckpt_every must be positive"),
            (self.keep_last > 0, "keep_last must be at least 1"),
            (self.log_every > 0, "log_every must be positive"),
            (self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}"),
            (self.mask_schedule in MASK_SCHEDULES, f"mask_schedule must be one of {MASK_SCHEDULES}"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
            (self.grad_clip >= 0, "grad_clip must be 0 (no clipping) or a positive gradient norm"),
            (self.init_ema in INIT_EMA, f"init_ema must be one of {', '.join(INIT_EMA)}"),
            (set(self.ema_warmup) <= set(EMA_WARMUP_KEYS),
             f"ema_warmup takes {', '.join(EMA_WARMUP_KEYS)}, not {', '.join(sorted(set(self.ema_warmup)))}"),
            (self.compile in (True, False, None), "compile must be true, false or auto"),
            (isinstance(self.activation_checkpointing, bool), "activation_checkpointing must be true or false"),
            (self.val_every == 0 or self.val_shards > 0,
             "val_every needs held-out data: set val_shards to the number of shards to hold out"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"{message} (check the recipe's train: section and the command-line flags)")
        # Defaults filled in, so the run's config.yaml records every value it trained with.
        optimizer = self.optimizer_config()
        self.optimizer = {**dataclasses.asdict(optimizer), "betas": list(optimizer.betas)}

    def optimizer_config(self) -> OptimizerConfig:
        unknown = set(self.optimizer) - {f.name for f in dataclasses.fields(OptimizerConfig)}
        if unknown:
            raise UserError(f"optimizer: has unknown setting(s) {', '.join(sorted(unknown))}; "
                            "known: name, betas, eps, weight_decay")
        name = self.optimizer.get("name", "adamw")
        given = {**self.optimizer, "betas": tuple(self.optimizer.get("betas", DEFAULT_BETAS.get(name, ())))}
        cfg = OptimizerConfig(**given)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        from mdt.fileio import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def resolve_config(recipe_path: str | Path | None, flags: dict[str, Any], base: dict[str, Any] | None = None,
                   sets: Iterable[str] = ()) -> TrainConfig:
    """Defaults <- `base` (a saved run config, on resume) <- the recipe's train: section <- flags <- `--set`
    (mdt.settings, as every command resolves its settings).

    On resume a recipe or flag may change only RESUME_CHANGEABLE: a resumed run trains with the settings
    it recorded, so a later edit of the recipe (or of mdt's defaults) never changes it silently.
    """
    cfg = resolve_settings(TrainConfig, "train", recipe=recipe_path, flags=flags, sets=sets, base=base,
                           aliases=OLD_NAMES)
    cfg.validate()
    if base:
        check_unchanged(cfg, base)
    return cfg


def check_unchanged(cfg: TrainConfig, base: dict[str, Any]) -> None:
    """A resume of the run that recorded `base` computes what it did: only RESUME_CHANGEABLE may differ."""
    recorded = apply_settings(TrainConfig(), base, "the run's config.yaml", OLD_NAMES)
    recorded.validate()
    before, after = recorded.to_dict(), cfg.to_dict()
    for key, value in after.items():
        if key not in RESUME_CHANGEABLE and value != before[key]:
            raise UserError(f"--resume {cfg.out}: {key} is {value} but the run was trained with {before[key]}; a "
                            f"resumed run keeps its recorded settings (only {', '.join(RESUME_CHANGEABLE)} may "
                            f"change): drop the new value, or start a new run with --init-from {cfg.out}")
