"""Shared pieces of the benchmarks in tools/: their common flags, timing, matmul peak, FLOP counts
(`mdt.models.stats`, the count `mdt models` prints), JSON lines."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from mdt.models.stats import model_stats

FAMILIES = ("DiT", "MDT", "MDTv2", "MaskDiT")
COMPILE_MODES = {"off": (False,), "on": (True,), "both": (False, True)}  # --compile: the passes to time


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


def add_common_arguments(parser: argparse.ArgumentParser, *, dtypes: list[str], families: list[str],
                         warmup: int) -> None:
    """The flags every benchmark takes, under one set of names (`--precision` and `--size` are aliases)."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", "--precision", dest="dtype", choices=dtypes, default="fp32")
    parser.add_argument("--sizes", "--size", dest="sizes", nargs="+", default=["S"], help="model sizes: T S B L XL")
    parser.add_argument("--families", nargs="+", default=families, choices=families)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", choices=sorted(COMPILE_MODES), default="off",
                        help="torch.compile the models: off, on, or both (each model twice, in this run)")


def pass_flops(name: str, mask_ratio: float) -> int:
    """Forward + backward FLOPs per image of one pass, as `mdt models` counts its forward."""
    stats = model_stats(name, mask_ratio, backward=True)
    return stats.forward_flops + stats.backward_flops


def step_pass_ratios(objective) -> list[float]:
    """The mask ratio of each model pass of one training step: 0 for a full pass. MDT's objective
    runs a full and a masked pass; a ratio drawn per batch counts at the middle of its range."""
    ratio = getattr(objective, "mask_ratio", 0.0)
    if hasattr(objective, "mask_ratio_span"):
        return [0.0, ratio + objective.mask_ratio_span / 2]
    return [ratio]


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
