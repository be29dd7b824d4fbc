"""Shared pieces of the benchmarks in tools/: timing, matmul peak, FLOP counting, JSON lines."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def emit(record: dict) -> None:
    """One JSON line per figure on stdout."""
    print(json.dumps(record), flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, *, warmup: int = 1, repeats: int = 3,
              reduce: Callable[[list[float]], float] = statistics.median) -> float:
    """Wall-clock seconds of `fn()` (median of `repeats` by default) after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return reduce(times)


def count_flops(fn: Callable[[], object]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int | None = None) -> float:
    """FLOP/s of a large square matrix product on this device and dtype: the roof to compare with."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    # The fastest of the repeats: a roof is the best the machine did (a shared VM's neighbours only slow it).
    seconds = time_call(lambda: a @ b, device, warmup=2, repeats=7, reduce=min)
    return 2 * size**3 / seconds


def machine() -> dict:
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
