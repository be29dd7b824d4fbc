"""DiT, MDTv2, MaskDiT and TREAD trained for the same wall-clock budget on one latent dataset, then compared.

The papers' claim is that masked training (MDTv2, MaskDiT) or token routing (TREAD, a DiT whose
tokens partly skip a span of blocks) reaches a given quality sooner; this measures it on your data
and machine. Every step is the command a user types (`mdt train`, `mdt sample`, `mdt fid`):
each family trains at the same size (width, depth, patch) with one optimizer setting (AdamW, lr 1e-3
constant after 50 warm-up steps, the demo recipe's batch, clip and EMA) and its paper recipe's objective (MDTv2's mask ratio and Min-SNR, MaskDiT's 50% mask and MAE weight
under EDM, TREAD's route under EDM, DiT unmasked; TREAD's route is placed by its paper's rule at the
model's depth, mdt.models.routing.paper_route). Training runs in --points segments of the budget (`mdt train
--max-wall-seconds`, then `--resume` with a larger budget: resume is exact, so the run is the
uninterrupted one); after each segment the EMA weights are sampled, each family with its own sampler
at the same network evaluations per sample (DDIM for the DDPM models, EDM's Heun for MaskDiT and TREAD), and
scored with `mdt fid` against held-out images. Families take turns segment by segment, so a load
spike on a shared machine does not fall on one family alone.

    python experiments/compare_families.py                          # the demo's data and size (builds demo/ if needed)
    python experiments/compare_families.py --data latents/x --ref images/val --size S --budget-seconds 3600

Writes --out (JSON lines, one per family per evaluation point and one summary per family, written
whole at the end: an interrupted comparison leaves no partial file) and a PNG beside it; the lines
also go to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mdt.errors import UserError
from mdt.eval.plots import read_log
from mdt.fileio import atomic_path
from mdt.models.registry import SIZES, model_config
from mdt.models.routing import paper_route
from mdt.recipe import recipe_section

REPO = Path(__file__).resolve().parents[1]
DEMO_RECIPE = REPO / "pipelines" / "demo.yaml"
# One optimizer setting for every family (the demo recipe's batch 32, clip 1 and EMA 0.995 besides).
COMMON_OPTIMIZER = ("--lr", "1e-3", "--set", "lr_schedule=constant", "--set", "warmup_steps=50")
DS_CONFIG = REPO / "deepspeed_configs" / "zero2.json"
# Each family's objective settings are its paper recipe's (mask ratio, MAE weight, Min-SNR).
PAPER_RECIPES = {"DiT": "dit-xl2-in256.yaml", "MDTv2": "mdtv2-xl2-in256.yaml", "MaskDiT": "maskdit-xl2-in256.yaml",
                 "TREAD": "tread-dit-b2-in256.yaml"}
PRESET_FAMILY = {"TREAD": "DiT"}  # TREAD is a DiT with routes, not a model family of its own
MARKER = ".compare_families"  # a work folder holding it was written by this tool and may be replaced
NEVER = 10**9  # steps: the budget, not the step count, ends each run
COLORS = {"DiT": "tab:blue", "MDTv2": "tab:orange", "MaskDiT": "tab:green", "TREAD": "tab:red"}


def progress(message: str) -> None:
    print(f"compare: {message}", file=sys.stderr, flush=True)


def mdt(*args: str, what: str, cwd: Path | None = None) -> None:
    """Run `mdt ARGS` as a user would; its output goes to stderr, so stdout holds only the results."""
    progress(f"{what}: mdt {shlex.join(args)}")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "mdt.cli", *args], cwd=cwd, stdout=sys.stderr,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        raise UserError(f"`mdt {args[0]}` for {what} failed with exit status {result.returncode}; its output is above")
    progress(f"{what}: done in {time.perf_counter() - start:.0f} s")


def demo_data(folder: Path) -> tuple[Path, Path]:
    """The demo's latents and held-out images, built with the demo's own commands unless already there
    (the same stamp files as the Makefile, so `make demo` reuses them too)."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes, encode = recipe_section(DEMO_RECIPE, "shapes"), recipe_section(DEMO_RECIPE, "encode")
    images, latents = folder / shapes["out"], folder / encode["out"]
    if not (images / ".complete").is_file():
        mdt("shapes", "--config", str(DEMO_RECIPE), what="demo data", cwd=folder)
        (images / ".complete").touch()
    if not (latents / "manifest.json").is_file():
        mdt("encode", "--config", str(DEMO_RECIPE), "--no-progress", what="demo latents", cwd=folder)
    return latents, images / "val"


def default_size() -> str:
    """The size and patch the demo trains (`MDTv2-T/2` -> `T/2`)."""
    return recipe_section(DEMO_RECIPE, "train")["model"].split("-", 1)[1]


def parse_size(size: str) -> str:
    match = re.fullmatch(r"(T|S|B|L|XL)(?:/2)?", size)
    if match is None:
        raise UserError(f"--size {size} is not a model size; choose one of {', '.join(SIZES)} (patch 2: "
                        "MDTv2 and MaskDiT have no other)")
    return f"{match.group(1)}/2"


def paper_settings(family: str, model: str, input_size: int) -> list[str]:
    """The paper recipe's objective, formulation and model options (a route placed at this depth)."""
    train = recipe_section(REPO / "pipelines" / PAPER_RECIPES[family], "train")
    options = {**train.get("model_options", {}), "input_size": input_size}
    if "routes" in options:
        options["routes"] = [dataclasses.asdict(paper_route(model_config(model).depth))]
    objective = [arg for key, value in train.get("objective", {}).items()
                 for arg in ("--set", f"objective.{key}={value}")]
    return ["--set", f"model_options={json.dumps(options)}", "--set", f"diffusion={json.dumps(train.get('diffusion', {}))}",
            *objective]


def model_name(family: str, size: str) -> str:
    return f"{PRESET_FAMILY.get(family, family)}-{size}"


def train_to(family: str, model: str, run: Path, args: argparse.Namespace, seconds: float, input_size: int) -> None:
    budget = ("--max-wall-seconds", f"{seconds:.3f}")
    if (run / "checkpoints" / "LATEST.json").is_file():
        mdt("train", "--resume", str(run), *budget, what=f"{family} to {seconds:.0f} s")
        return
    mdt("train", "--config", str(DEMO_RECIPE), "--deepspeed-config", str(DS_CONFIG), "--data", str(args.data),
        "--out", str(run), "--model", model, "--steps", str(NEVER), *budget, "--val-every", str(args.val_every),
        # Each family under its paper's formulation and output (the demo's own is DiT under EDM), at one
        # constant lr for all (the demo's cosine schedule spans a fixed number of steps, not a budget).
        *paper_settings(family, model, input_size), *COMMON_OPTIMIZER,
        what=f"{family} to {seconds:.0f} s")


def sampler_for(run: Path, evaluations: int) -> tuple[list[str], int]:
    """The run's own sampler at about `evaluations` network evaluations per sample, and their number:
    DDIM (one per step) for a DDPM model, EDM's Heun (2n - 1 for n steps) for an EDM one."""
    formulation = json.loads((run / "ema" / "diffusion.json").read_text()).get("formulation", "ddpm")
    if formulation == "edm":
        steps = max(2, (evaluations + 1) // 2)  # the last step is Euler: 2 steps at least
        return ["--sampler", "edm-heun", "--steps", str(steps)], 2 * steps - 1
    return ["--sampler", "ddim", "--steps", str(evaluations)], evaluations


def fid_of(family: str, run: Path, point: int, args: argparse.Namespace, ref: Path) -> dict:
    samples, scores = run.parent / f"samples-{point}", run.parent / f"fid-{point}.json"
    sampler, evaluations = sampler_for(run, args.sample_steps)
    mdt("sample", "--config", str(DEMO_RECIPE), "--ckpt", str(run), "--out", str(samples),
        "--num-samples", str(args.num_samples), *sampler, what=f"{family} samples")
    mdt("fid", "--config", str(DEMO_RECIPE), "--samples", str(samples), "--ref", str(ref), "--out", str(scores),
        "--cache-dir", str(args.out.parent / "fid-cache"), what=f"{family} FID")
    return {"fid": float(json.loads(scores.read_text())["fid"]), "sampler": " ".join(sampler),
            "network_evaluations": evaluations}


def at_stop(run: Path) -> dict:
    """Step, training clock and validation loss where the run's latest segment stopped."""
    summary = json.loads((run / "metrics.json").read_text())
    step = summary["stop_step"]
    records = [r for r in read_log(run) if r["step"] == step]
    train = next(r for r in records if "loss" in r)
    val = next((r["val_loss"] for r in records if "val_loss" in r), None)
    return {"step": step, "wall_time_s": train["wall_time_s"], "val_loss": val, "summary": summary}


def plot(results: list[dict], curves: dict[str, list[tuple[float, float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for family, curve in curves.items():
        left.plot([t for t, _ in curve], [v for _, v in curve], "o-", ms=2.5, lw=1.2, color=COLORS[family],
                  label=family)
        points = [(r["wall_time_s"], r["fid"]) for r in results if r["family"] == family and "summary" not in r]
        right.plot([t for t, _ in points], [f for _, f in points], "o-", ms=4, color=COLORS[family], label=family)
    # The validation losses are the objectives' own: DDPM eps-MSE + VB (MDTv2's Min-SNR weighted),
    # EDM's for MaskDiT and TREAD; each curve shows its family's progress, only FID compares across families.
    left.set(xlabel="training wall-clock (s)", ylabel="validation loss (each family's own)", yscale="log")
    right.set(xlabel="training wall-clock (s)", ylabel="FID (clean, lower is better)")
    # 0.05, not 5x10^-2, on the log axis; between decades only 2 and 5 are labelled, so none overlap.
    left.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    left.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "25" else ""))
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)


def prepare_work(work: Path) -> None:
    if work.exists() and any(work.iterdir()) and not (work / MARKER).is_file():
        raise UserError(f"--work {work} holds files this tool did not write; pass an empty or new folder")
    shutil.rmtree(work, ignore_errors=True)  # a previous comparison's runs: start over
    work.mkdir(parents=True)
    (work / MARKER).touch()


def check_args(args: argparse.Namespace) -> None:
    if not args.budget_seconds > 0 or not math.isfinite(args.budget_seconds):
        raise UserError(f"--budget-seconds must be a positive number of seconds, not {args.budget_seconds}")
    for name, least in (("points", 1), ("num_samples", 2), ("sample_steps", 1), ("val_every", 1)):
        if getattr(args, name) < least:
            raise UserError(f"--{name.replace('_', '-')} must be at least {least}")
    if args.data is not None and not (args.data / "manifest.json").is_file():
        raise UserError(f"--data {args.data} is not a latent dataset (no manifest.json); pass a folder written "
                        "by `mdt encode`")
    if args.data is not None and args.ref is None:
        raise UserError("--data needs --ref: held-out images (a folder) or `mdt fid-ref` statistics for the FID")
    if args.ref is not None and not args.ref.exists():
        raise UserError(f"--ref {args.ref} does not exist")


def compare(args: argparse.Namespace) -> list[dict]:
    size = parse_size(args.size)
    check_args(args)
    if args.data is None:
        args.data, ref = demo_data(args.demo)
        args.ref = args.ref or ref
    input_size = json.loads((args.data / "manifest.json").read_text())["latent_shape"][1]
    work = args.work or args.out.parent / "work"
    prepare_work(work)
    runs = {family: work / family / "run" for family in args.families}
    results: list[dict] = []
    for point in range(1, args.points + 1):
        seconds = args.budget_seconds * point / args.points
        for family, run in runs.items():
            train_to(family, model_name(family, size), run, args, seconds, input_size)
            stop = at_stop(run)
            line = {"family": family, "model": model_name(family, size), "step": stop["step"],
                    "wall_time_s": round(stop["wall_time_s"], 2), "val_loss": stop["val_loss"],
                    **fid_of(family, run, point, args, args.ref)}
            results.append(line)
            print(json.dumps(line), flush=True)
    curves, at_budget = {}, {r["family"]: r for r in results}  # each family's last point: the whole budget
    for family, run in runs.items():
        curves[family] = [(r["wall_time_s"], r["val_loss"]) for r in read_log(run) if "val_loss" in r]
        summary, last = at_stop(run)["summary"], at_budget[family]
        line = {"family": family, "summary": True, "model": last["model"], "budget_seconds": args.budget_seconds,
                "steps": summary["stop_step"], "train_seconds": round(summary["wall_time_s"], 2),
                "images_per_s": summary["mean_images_per_s"], "global_batch": summary["global_batch"],
                "final_val_loss": summary["final_val_loss"], "fid": last["fid"], "num_samples": args.num_samples,
                "sampler": last["sampler"], "network_evaluations": last["network_evaluations"],
                "reference": str(args.ref)}
        results.append(line)
        print(json.dumps(line), flush=True)
    plot(results, curves, args.plot or args.out.with_suffix(".png"),
         f"{size} on {'/'.join(args.data.resolve().parts[-2:])}: {args.budget_seconds:g} s of training per family, FID of "
         f"{args.num_samples} samples")
    with atomic_path(args.out) as tmp:
        tmp.write_text("".join(json.dumps(line) + "\n" for line in results))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="latent dataset (`mdt encode`); default: the demo's, built in --demo")
    parser.add_argument("--ref", type=Path, help="FID reference: held-out images or `mdt fid-ref` statistics "
                                                 "(default with the demo's data: its held-out images)")
    parser.add_argument("--demo", type=Path, default=Path("demo"), help="the demo folder to build or reuse")
    parser.add_argument("--size", default=default_size(), help="model size, same for every family "
                                                               "(default: the demo's)")
    parser.add_argument("--families", nargs="+", default=list(PAPER_RECIPES), choices=list(PAPER_RECIPES),
                        help="what to compare (default: all)")
    parser.add_argument("--budget-seconds", type=float, default=120.0, help="training wall-clock per family")
    parser.add_argument("--points", type=int, default=3, help="evaluations per family, at equal fractions of the budget")
    parser.add_argument("--num-samples", type=int, default=120, help="samples per FID")
    parser.add_argument("--sample-steps", type=int, default=20, help="network evaluations per sample (per guidance branch)")
    parser.add_argument("--val-every", type=int, default=25, help="validation loss every K steps")
    parser.add_argument("--out", type=Path, default=Path("runs/compare/results.jsonl"), help="JSON lines to write")
    parser.add_argument("--plot", type=Path, help="PNG to write (default: --out with .png)")
    parser.add_argument("--work", type=Path, help="runs, samples and scores (default: work/ beside --out; replaced)")
    args = parser.parse_args()
    try:
        compare(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    progress(f"wrote {args.out} and {args.plot or args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
