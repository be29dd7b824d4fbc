"""The one place that knows DeepSpeed: config resolution, initialisation, ZeRO-aware weights and
checkpoint save/load. Everything else in the trainer is written as if for one process.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mdt import distributed
from mdt.errors import UserError
from mdt.precision import autocast_dtype, resolve_auto


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group() -> None:
    """Join the launcher's process group, or make a one-process group for a plain `mdt train`."""
    import deepspeed

    if not distributed.launched_distributed():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(distributed.local_rank())
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)


def resolve_deepspeed_config(path: str | Path, *, micro_batch: int, grad_accum: int, world_size: int,
                             grad_clip: float, precision: str) -> dict[str, Any]:
    """Read a ZeRO config and fill its "auto" values from the run's settings.

    An explicit value that contradicts the command line is refused rather than silently used.
    """
    path = Path(path)
    if not path.is_file() and not path.is_absolute():
        path = Path(__file__).resolve().parents[2] / path  # the repository's deepspeed_configs/
    if not path.is_file():
        raise UserError(f"DeepSpeed config {path} does not exist; pass one of deepspeed_configs/zero{{1,2,3}}.json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"DeepSpeed config {path} is not valid JSON: {err}") from err
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise UserError(f"DeepSpeed config {path} has a '{section}' section; remove it: the optimizer and lr "
                            "schedule come from the training settings (--lr, warmup_steps, lr_schedule)")
    wanted = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": grad_clip,
    }
    for key, value in wanted.items():
        given = config.get(key, "auto")
        if given != "auto" and given != value:
            raise UserError(f"DeepSpeed config {path} sets {key}={given} but the run asks for {value}; "
                            f'set it to "auto" or change the flag')
        config[key] = value
    mode = resolve_auto(precision)
    bf16 = mode == "bf16"
    given_bf16 = config.get("bf16", {}).get("enabled", "auto")
    if given_bf16 != "auto" and given_bf16 != bf16:
        raise UserError(f"DeepSpeed config {path} sets bf16.enabled={given_bf16} but --precision is {precision}; "
                        'set it to "auto"')
    config["bf16"] = {**config.get("bf16", {}), "enabled": bf16}
    if config.get("fp16", {}).get("enabled") is True:
        raise UserError(f"DeepSpeed config {path} enables fp16 weights; remove it and train with --precision "
                        "amp-fp16 (fp16 autocast over fp32 weights) or bf16")
    if "torch_autocast" in config:
        raise UserError(f"DeepSpeed config {path} has a 'torch_autocast' section; remove it: --precision "
                        "amp-bf16 or amp-fp16 sets it")
    dtype = autocast_dtype(mode)
    if dtype is not None:
        if dtype == torch.float16 and grad_clip > 0:
            # DeepSpeed 0.19's ZeRO optimizers clip before its GradScaler unscales: the norm they clip by is
            # the loss-scaled one, so clipping would shrink every update by the loss scale.
            raise UserError(f"--precision amp-fp16 with grad_clip={grad_clip:g}: DeepSpeed would clip the loss-scaled "
                            "gradients; train amp-fp16 with grad_clip 0, or amp-bf16 with clipping")
        # No module listed as lower-precision safe: gradients are reduced in fp32, as DDP does under torch.amp.
        config["torch_autocast"] = {"enabled": True, "dtype": str(dtype).removeprefix("torch."),
                                    "lower_precision_safe_modules": []}
    return config


class Engine:
    """A DeepSpeed engine around the model, its optimizer and lr schedule."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, config: dict[str, Any]):
        import deepspeed

        self.config = config
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=config)
        self.zero_stage = self.engine.zero_optimization_stage()
        self.param_names = [n for n, _ in self.engine.module.named_parameters()]

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.engine.bfloat16_enabled() else torch.float32

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.engine(*args, **kwargs)

    def parameters(self):
        return self.engine.module.parameters()

    def backward_and_step(self, loss: torch.Tensor) -> None:
        """Backward a micro-batch's loss; the optimizer steps at accumulation boundaries."""
        self.engine.backward(loss)
        self.engine.step()

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def loss_scale(self) -> float | None:
        """The GradScaler's scale under fp16 autocast (amp-fp16); None where no loss is scaled."""
        scaler = getattr(self.engine.optimizer, "torch_autocast_gradscaler", None)
        return None if scaler is None else float(scaler.get_scale())

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def master_partitions(self) -> list[torch.Tensor]:
        """This rank's share of the fp32 master weights, as the optimizer's flat tensors.

        An EMA kept over these is sharded like the optimizer state and costs one local lerp per
        group per step: no gathering (gathering every parameter each step cost more than the
        forward and backward of XL/2 on an H100).
        """
        optimizer = self.engine.optimizer
        if self.zero_stage in (1, 2):
            return list(optimizer.single_partition_of_fp32_groups)
        if self.zero_stage == 3:
            return list(optimizer.fp32_partitioned_groups_flat)
        raise UserError("the DeepSpeed config must enable ZeRO (zero_optimization.stage 1, 2 or 3)")

    @contextlib.contextmanager
    def masters_replaced_by(self, tensors: list[torch.Tensor]) -> Iterator[None]:
        """Temporarily put `tensors` (shaped like master_partitions()) in place of the fp32 masters,
        so DeepSpeed's own gather/scatter helpers read or write them."""
        masters = self.master_partitions()
        saved = [m.detach().clone() for m in masters]
        with torch.no_grad():
            for master, tensor in zip(masters, tensors, strict=True):
                master.copy_(tensor)
        try:
            yield
        finally:
            with torch.no_grad():
                for master, original in zip(masters, saved, strict=True):
                    master.copy_(original)

    @torch.no_grad()
    def scatter_full_params(self, full: dict[str, torch.Tensor], into: list[torch.Tensor]) -> None:
        """Write whole fp32 parameters `full` into partition tensors `into` (inverse of a gather)."""
        from deepspeed.utils import safe_set_full_fp32_param

        with self.masters_replaced_by(into):
            for name, param in self.engine.module.named_parameters():
                safe_set_full_fp32_param(param, full[name].to(self.device, torch.float32))
            for target, master in zip(into, self.master_partitions(), strict=True):
                target.copy_(master)

    @torch.no_grad()
    def full_fp32_params(self, main_only: bool = False) -> dict[str, torch.Tensor]:
        """Every parameter whole and in fp32: the optimizer's master copy under bf16 or ZeRO-3.

        Collective under ZeRO (every rank must call it). `main_only`: only rank 0 keeps the tensors, in
        host memory (the others return {}), so a large gather does not pile up on every device.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        params = {}
        keep = not main_only or distributed.is_main()
        for name, param in self.engine.module.named_parameters():
            full = safe_get_full_fp32_param(param) if self.zero_stage > 0 else None
            if keep:
                full = full if full is not None else param.detach().float()
                params[name] = full.cpu() if main_only else full
        return params

    @torch.no_grad()
    def set_full_fp32_params(self, full: dict[str, torch.Tensor]) -> None:
        """Write whole fp32 parameters into this rank's fp32 masters (the module's low-precision copy is
        left as it is: build the module from the same weights)."""
        from deepspeed.utils import safe_set_full_fp32_param

        for name, param in self.engine.module.named_parameters():
            safe_set_full_fp32_param(param, full[name].to(self.device, torch.float32))

    def _base_optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer.optimizer  # the torch optimizer over the flat fp32 partitions

    @torch.no_grad()
    def full_optimizer_state(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """Collective: the optimizer's state as if trained on one rank, for a resume on another world size
        or ZeRO stage. Returns ({state key: {parameter name: fp32 tensor}} for every per-element state
        (AdamW's exp_avg and exp_avg_sq, Adan's four moments), and the rest as JSON-ready values:
        the partitions' scalars such as AdamW's step, per-group values such as Adan's step, and the
        lr schedule's and loss scaler's state)."""
        base, masters = self._base_optimizer(), self.master_partitions()
        states = [base.state.get(m, {}) for m in masters]
        # Rank 0's keys for all: every rank must gather the same states (a rank whose partition holds no
        # elements may have no state for it: it contributes zeros).
        keys = [sorted({k for state in states for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0})]
        if distributed.is_initialized():
            torch.distributed.broadcast_object_list(keys, src=0)
        keys = keys[0]

        tensors: dict[str, dict[str, torch.Tensor]] = {}
        for key in keys:
            with self.masters_replaced_by([state.get(key, torch.zeros_like(m)) for state, m in zip(states, masters,
                                                                                                  strict=True)]):
                tensors[key] = self.full_fp32_params(main_only=True)
        # The same in every partition (AdamW's step): one copy, from a partition that has state.
        scalars = next(({k: _scalar_to_json(v) for k, v in state.items() if k not in keys} for state in states
                        if state), {})
        scaler = getattr(self.engine.optimizer, "torch_autocast_gradscaler", None)
        rest = {
            "partition_scalars": scalars,
            "group_steps": [group.get("step") for group in base.param_groups],
            "lr_scheduler": {k: v for k, v in self.engine.lr_scheduler.state_dict().items() if k != "lr_lambdas"},
            "loss_scaler": None if scaler is None else scaler.state_dict(),
        }
        return tensors, rest

    @torch.no_grad()
    def load_full_optimizer_state(self, tensors: dict[str, dict[str, torch.Tensor]], rest: dict[str, Any],
                                  step: int, global_batch: int) -> None:
        """Inverse of full_optimizer_state on this engine's world size and ZeRO stage (each rank keeps its
        partition), and DeepSpeed's step counters set to `step`."""
        base, masters = self._base_optimizer(), self.master_partitions()
        for key, full in tensors.items():
            parts = [torch.zeros_like(m) for m in masters]
            self.scatter_full_params(full, into=parts)
            for master, part in zip(masters, parts, strict=True):
                base.state[master][key] = part
        for master in masters:
            for key, value in rest["partition_scalars"].items():
                base.state[master][key] = _scalar_from_json(value, master.device)
        for group, group_step in zip(base.param_groups, rest["group_steps"], strict=False):
            if group_step is not None:
                group["step"] = group_step
        scheduler = self.engine.lr_scheduler
        scheduler.load_state_dict({**rest["lr_scheduler"], "lr_lambdas": [None] * len(base.param_groups)})
        for group, lr in zip(base.param_groups, scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
        scaler = getattr(self.engine.optimizer, "torch_autocast_gradscaler", None)
        if scaler is not None and rest.get("loss_scaler"):
            scaler.load_state_dict(rest["loss_scaler"])
        self.engine.global_steps = step
        self.engine.global_samples = step * global_batch

    def save(self, directory: Path, tag: str, client_state: dict[str, Any]) -> None:
        """Collective: every rank writes its optimizer partition under directory/tag."""
        self.engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)

    def load(self, directory: Path, tag: str) -> dict[str, Any]:
        path, client_state = self.engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
        if path is None:
            raise UserError(f"could not load the DeepSpeed checkpoint {directory / tag}; it is incomplete or from "
                            "another ZeRO layout; resume with the same world size and DeepSpeed config")
        return client_state


def _scalar_to_json(value: Any) -> Any:
    """A per-partition optimizer scalar (AdamW keeps its step as a 0-d tensor) as JSON."""
    if torch.is_tensor(value):
        return {"tensor": value.item(), "dtype": str(value.dtype).removeprefix("torch."),
                "on_partition_device": value.device.type != "cpu"}
    return value


def _scalar_from_json(value: Any, device: torch.device) -> Any:
    if isinstance(value, dict) and "tensor" in value:
        return torch.tensor(value["tensor"], dtype=getattr(torch, value["dtype"]),
                            device=device if value["on_partition_device"] else "cpu")
    return value
