"""AdamW against Adan for MDTv2 at equal training wall-clock, through `mdt train` on a CPU.

Both runs are the demo's MDTv2-T/2 recipe (pipelines/demo.yaml: input_size from the data, lr, micro
batch 32, warmup 50, EMA 0.995, seed 0) with grad_clip 1.0 and OMP_NUM_THREADS=1, differing only in
the optimizer: AdamW (0.9, 0.999) or Adan (0.98, 0.92, 0.99). Each gets `--seconds` of training time
(`mdt train --max-wall-seconds`), spent in --segments turns (`--resume` with a larger budget; resume is
exact), AdamW and Adan alternating, so a load spike on a shared machine does not fall on one alone.
Validation (1 held-out shard) every 50 steps and at each segment's end.

Stdout: JSON lines only, one per validation point per optimizer (optimizer, step, wall_time_s,
val_loss, val_mse) and one summary per optimizer; the target is AdamW's final value of --metric
(val_mse: the eps-MSE; val_loss adds the VB term) and time_to_target_s is the first training time
at which each optimizer's --metric was at or below it (null: never). Progress goes to stderr.

    mkdir -p /tmp/adan-bench && cd /tmp/adan-bench && mdt shapes --config /work/main/pipelines/demo.yaml \
        && mdt encode --config /work/main/pipelines/demo.yaml --no-progress && cd /work/main
    .venv/bin/python tools/benchmarks/bench_optimizers.py --data /tmp/adan-bench/latents --out /tmp/adan-bench/runs \
        > docs/assets/bench_optimizers_cpu.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "pipelines" / "demo.yaml"
DS_CONFIG = REPO / "deepspeed_configs" / "zero2.json"
OPTIMIZERS = {"adamw": [0.9, 0.999], "adan": [0.98, 0.92, 0.99]}
MARKER = ".bench_optimizers"  # an --out holding it was written by this tool and may be replaced
NEVER = 10**9  # steps: the budget ends each run


def progress(message: str) -> None:
    print(f"bench_optimizers: {message}", file=sys.stderr, flush=True)


def mdt_train(args: list[str]) -> None:
    """`mdt train ARGS` as a user types it, one thread, its output on stderr."""
    progress("mdt train " + " ".join(args))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "mdt.cli", "train", *args], stdout=sys.stderr, env=env)
    if result.returncode != 0:
        raise SystemExit(f"mdt train exited with status {result.returncode}; its output is above")


def train_to(name: str, run: Path, seconds: float, args: argparse.Namespace) -> None:
    budget = ["--max-wall-seconds", f"{seconds:.3f}"]
    if (run / "checkpoints" / "LATEST.json").is_file():
        mdt_train(["--resume", str(run), *budget])
        return
    input_size = json.loads((args.data / "manifest.json").read_text())["latent_shape"][1]
    betas = ",".join(map(str, OPTIMIZERS[name]))
    mdt_train(["--config", str(RECIPE), "--deepspeed-config", str(DS_CONFIG), "--data", str(args.data),
               "--out", str(run), "--model", "MDTv2-T/2", "--steps", str(NEVER), *budget, "--lr", str(args.lr),
               "--seed", "0", "--val-every", "50", "--val-shards", "1", "--ckpt-every", str(NEVER),
               "--set", f"model_options.input_size={input_size}", "--set", f"optimizer.name={name}",
               "--set", f"optimizer.betas=[{betas}]", "--set", "grad_clip=1.0"])


def val_points(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if "val_loss" in r]


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "nproc": os.cpu_count(), "omp_num_threads": 1,
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%MZ")}


def bench(args: argparse.Namespace) -> list[dict]:
    if not (args.data / "manifest.json").is_file():
        raise SystemExit(f"--data {args.data} is not a latent dataset (no manifest.json); run `mdt encode` first")
    if args.out.exists() and any(args.out.iterdir()) and not (args.out / MARKER).is_file():
        raise SystemExit(f"--out {args.out} holds files this tool did not write; pass an empty or new folder")
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    (args.out / MARKER).touch()
    runs = {name: args.out / name for name in OPTIMIZERS}
    for segment in range(1, args.segments + 1):
        order = list(runs) if segment % 2 else list(runs)[::-1]  # who goes first alternates too
        for name in order:
            train_to(name, runs[name], args.seconds * segment / args.segments, args)
    lines: list[dict] = []
    for name, run in runs.items():
        lines += [{"optimizer": name, "step": r["step"], "wall_time_s": round(r["wall_time_s"], 2),
                   "val_loss": r["val_loss"], "val_mse": r["val_mse"]} for r in val_points(run)]
    target = val_points(runs["adamw"])[-1][args.metric]
    for name, run in runs.items():
        summary, points = json.loads((run / "metrics.json").read_text()), val_points(run)
        reached = next((p["wall_time_s"] for p in points if p[args.metric] <= target), None)
        lines.append({"optimizer": name, "summary": True, "betas": OPTIMIZERS[name], "lr": args.lr,
                      "grad_clip": 1.0, "model": "MDTv2-T/2", "budget_seconds": args.seconds,
                      "segments": args.segments, "steps": summary["stop_step"],
                      "train_seconds": round(summary["wall_time_s"], 2),
                      "images_per_s": round(summary["stop_step"] * summary["global_batch"] / summary["wall_time_s"], 1),
                      "final_val_loss": points[-1]["val_loss"], "final_val_mse": points[-1]["val_mse"],
                      "best_val_mse": min(p["val_mse"] for p in points), "target_metric": args.metric,
                      "target": target, "target_is": "adamw final",
                      "time_to_target_s": None if reached is None else round(reached, 2), **machine()})
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="latent dataset (`mdt encode`), e.g. the demo's")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_optimizers"),
                        help="folder for the two runs (replaced if this tool wrote it)")
    parser.add_argument("--seconds", type=float, default=150.0, help="training wall-clock per optimizer")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, both optimizers")
    parser.add_argument("--segments", type=int, default=3, help="turns per optimizer, alternating")
    parser.add_argument("--metric", choices=("val_mse", "val_loss"), default="val_mse",
                        help="validation figure the target and time_to_target_s use")
    args = parser.parse_args()
    if not args.seconds > 0 or args.segments < 1:
        parser.error("--seconds must be positive and --segments at least 1")
    for line in bench(args):
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
