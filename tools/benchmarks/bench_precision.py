"""Seconds per training step of each --precision mode, through the real `mdt train` command.

Makes (or reuses, under --work) 64 noisy 32-px images in 2 classes, encodes them with
`mdt encode --vae pixel --resolution 32` (3x32x32 "latents": a /2 model then runs 256 tokens,
as at 256 px on ImageNet), then trains each mode for --steps steps in its own process (DeepSpeed
keeps torch-autocast state in module globals), round-robin over --rounds rounds so that load drift
hits every mode alike. A run's step time is the median of RUN/metrics.jsonl's step_time_s with
the first 2 steps dropped as warm-up. Prints JSON lines on stdout (the machine, one line per mode
and round, one summary per mode: median over rounds and its ratio to fp32's, and the best round,
the least disturbed on a shared machine); progress goes to stderr. docs/assets/bench_precision_cpu.jsonl:

    .venv/bin/python tools/benchmarks/bench_precision.py --work /tmp/mdt-bench-precision --rounds 2 --steps 4 \\
        > docs/assets/bench_precision_cpu.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmark_utils import emit, machine

MODES = ("fp32", "tf32", "amp-bf16", "amp-fp16", "bf16")
WARMUP_STEPS = 2
MDT = str(Path(sys.executable).with_name("mdt"))


def progress(message: str) -> None:
    print(f"[bench_precision] {message}", file=sys.stderr, flush=True)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def make_data(work: Path) -> Path:
    """The encoded dataset under `work`, written on the first call and reused after."""
    latents = work / "latents"
    if (latents / "manifest.json").is_file():
        progress(f"reusing {latents}")
        return latents
    images = work / "images"
    rng = np.random.default_rng(0)
    for c in range(2):
        folder = images / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(32):
            base = np.zeros((32, 32, 3), np.int64)
            base[..., c] = 120
            pixels = np.clip(base + rng.integers(0, 100, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    progress(f"encoding {images} -> {latents}")
    subprocess.run([MDT, "encode", str(images), str(latents), "--vae", "pixel", "--resolution", "32",
                    "--shard-size", "16", "--workers", "0", "--no-progress"], check=True, stdout=sys.stderr)
    return latents


def train_once(args: argparse.Namespace, data: Path, mode: str, round_: int) -> dict:
    """One `mdt train` run of `mode`; the median step seconds after warm-up, or the error."""
    out = args.work / "runs" / f"{mode}-r{round_}"
    shutil.rmtree(out, ignore_errors=True)
    command = [MDT, "train", "--data", str(data), "--out", str(out), "--model", args.model,
               "--set", "model_options.input_size=32", "--micro-batch", str(args.batch),
               "--steps", str(args.steps), "--log-every", "1", "--num-workers", "0", "--precision", mode]
    start, load, cpu = time.perf_counter(), os.getloadavg()[0], child_cpu_seconds()
    proc = subprocess.run(command, capture_output=True, text=True)
    # The 1-minute load average before and after: other work on a shared machine shows in it.
    record: dict = {"figure": "precision_run", "mode": mode, "round": round_, "model": args.model,
                    "batch": args.batch, "steps": args.steps, "process_s": round(time.perf_counter() - start, 1),
                    "load_1m": [round(load, 2), round(os.getloadavg()[0], 2)],
                    "process_cpu_s": round(child_cpu_seconds() - cpu, 1)}  # user+sys, start-up included
    if proc.returncode != 0:
        lines = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()] or lines
        return {**record, "error": errors[-1] if errors else f"exit status {proc.returncode}"}
    rows = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [r["step_time_s"] for r in map(json.loads, rows) if "step_time_s" in r and r["step"] > WARMUP_STEPS]
    shutil.rmtree(out, ignore_errors=True)  # its checkpoint is large and of no use here
    if not times:
        return {**record, "error": "no step after the warm-up in metrics.jsonl"}
    seconds = statistics.median(times)
    return {**record, "timed_steps": len(times), "step_s": round(seconds, 4),
            "images_per_s": round(args.batch / seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mdt-bench-precision")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must exceed the {WARMUP_STEPS} warm-up steps")
    emit({"figure": "machine", "cpu": cpu_name(), "cores": os.cpu_count(),
          "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "date": datetime.date.today().isoformat(),
          **machine()})
    data = make_data(args.work)
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for round_ in range(args.rounds):
        for mode in MODES:
            progress(f"round {round_ + 1}/{args.rounds}: {mode}")
            record = train_once(args, data, mode, round_)
            emit(record)
            runs[mode].append(record)
    done = {mode: [r["step_s"] for r in rs if "step_s" in r] for mode, rs in runs.items()}
    step = {mode: statistics.median(times) for mode, times in done.items() if times}
    best = {mode: min(times) for mode, times in done.items() if times}  # the least disturbed round
    for mode, records in runs.items():
        summary = {"figure": "precision_summary", "mode": mode, "model": args.model, "batch": args.batch,
                   "rounds": sum("step_s" in r for r in records)}
        if mode in step:
            summary |= {"step_s": round(step[mode], 4), "images_per_s": round(args.batch / step[mode], 2),
                        "ratio_to_fp32": round(step[mode] / step["fp32"], 3) if "fp32" in step else None,
                        "best_step_s": round(best[mode], 4),
                        "best_ratio_to_fp32": round(best[mode] / best["fp32"], 3) if "fp32" in best else None}
        errors = sorted({r["error"] for r in records if "error" in r})
        if errors:
            summary["errors"] = errors
        emit(summary)


if __name__ == "__main__":
    main()
