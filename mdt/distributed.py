"""Process-group helpers with single-process fallbacks.

Everything else in the package is written as if for one process; it asks these helpers for its
rank and world size. Works under torchrun, the DeepSpeed launcher, or plain `python`.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def launched_distributed() -> bool:
    """True when a launcher (torchrun, deepspeed) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(backend: str | None = None, timeout_minutes: int = 30) -> None:
    """Join the process group the launcher described (no-op for a single process)."""
    if dist.is_available() and dist.is_initialized():
        return
    if not launched_distributed():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only."""
    if is_main():
        print(*args, **kwargs, flush=True)


def all_reduce_sum(value: float | int) -> float:
    """Sum a Python number over all ranks (identity for one process)."""
    if not is_initialized():
        return value
    device = torch.device("cuda", local_rank()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")
