"""Training configuration: defaults, a recipe's `train:` section, then command-line overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mdt.errors import UserError
from mdt.recipe import recipe_section

LR_SCHEDULES = ("constant", "cosine")
MASK_SCHEDULES = ("none", "zero", "cosine")
PRECISIONS = ("auto", "fp32", "bf16")


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
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    min_lr: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
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
    tensorboard: bool = False
    compile: bool | None = None  # torch.compile the model; None: on CUDA yes, on the CPU no
    activation_checkpointing: bool = False  # recompute block activations in backward (24-40 GB cards)

    def validate(self) -> None:
        if isinstance(self.compile, str):  # `--set compile=true`, or `compile: auto` in a recipe
            self.compile = None if self.compile == "auto" else _parse("compile", self.compile)
        if not self.data:
            raise UserError("no training data given; pass --data LATENTS (a folder written by `mdt encode`)")
        if not self.out:
            raise UserError("no run folder given; pass --out RUN")
        checks = [
            (self.steps > 0, "steps must be positive"),
            (isinstance(self.max_wall_seconds, (int, float)) and not isinstance(self.max_wall_seconds, bool)
             and self.max_wall_seconds >= 0, "max_wall_seconds must be 0 (no budget) or a positive number of seconds"),
            (self.micro_batch > 0, "micro_batch must be positive"),
            (self.grad_accum > 0, "grad_accum must be positive"),
            (self.lr > 0, "lr must be positive"),
            (0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1)"),
            (self.ckpt_every > 0, "ckpt_every must be positive"),
            (self.keep_last > 0, "keep_last must be at least 1"),
            (self.log_every > 0, "log_every must be positive"),
            (self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}"),
            (self.mask_schedule in MASK_SCHEDULES, f"mask_schedule must be one of {MASK_SCHEDULES}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}"),
            (self.compile in (True, False, None), "compile must be true, false or auto"),
            (isinstance(self.activation_checkpointing, bool), "activation_checkpointing must be true or false"),
            (self.val_every == 0 or self.val_shards > 0,
             "val_every needs held-out data: set val_shards to the number of shards to hold out"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"{message} (check the recipe's train: section and the command-line flags)")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["adam_betas"] = list(self.adam_betas)
        return data

    def save(self, path: Path) -> None:
        from mdt.fileio import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _parse(key: str, value: Any) -> Any:
    """Command-line strings become YAML scalars (`--set objective.mask_ratio=0.4` gives 0.4)."""
    if not isinstance(value, str):
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise UserError(f"cannot parse the value of '{key}': {value!r} ({err})") from err
    if isinstance(parsed, str):  # YAML reads "1e-4" as a string
        try:
            return float(parsed)
        except ValueError:
            return parsed
    return parsed


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any], source: str) -> TrainConfig:
    """Set fields from `overrides`; dotted keys (`objective.mask_ratio`) reach into dict fields."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for key, value in overrides.items():
        if value is None:
            continue
        head, _, sub = key.partition(".")
        if head not in fields:
            raise UserError(f"unknown training setting '{key}' in {source}; known: {', '.join(sorted(fields))}")
        current = getattr(cfg, head)
        if sub:
            if not isinstance(current, dict):
                raise UserError(f"'{head}' in {source} is not a section, so '{key}' cannot be set")
            current[sub] = _parse(key, value)
        elif isinstance(current, str) or current is None:
            setattr(cfg, head, value)  # strings stay strings ("1e-4" as a path, say)
        else:
            value = _parse(key, value)
            setattr(cfg, head, tuple(value) if head == "adam_betas" else value)
    return cfg


def resolve_config(recipe_path: str | Path | None, overrides: dict[str, Any],
                   base: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults <- `base` (a saved run config, on resume) <- the recipe's train: section <- overrides."""
    cfg = TrainConfig()
    if base:
        apply_overrides(cfg, base, "the run's config.yaml")
    if recipe_path is not None:
        section = recipe_section(recipe_path, "train")
        apply_overrides(cfg, section, str(recipe_path))
    apply_overrides(cfg, overrides, "the command line")
    cfg.validate()
    return cfg
