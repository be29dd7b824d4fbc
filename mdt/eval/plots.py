"""Loss curves of a training run, drawn from its JSON-lines log (RUN/metrics.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

from mdt.errors import UserError
from mdt.fileio import atomic_path


def read_log(run: Path) -> list[dict]:
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass a run folder written by `mdt train` (or its metrics.jsonl)")
    records = []
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError as err:  # not JSON, or not UTF-8 text at all
                raise UserError(f"{path} line {number} is not JSON ({err}); the log is damaged") from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise UserError(f"{path} line {number} is not a record with a step; the log is damaged")
            records.append(record)
    return records


def cumulative_wall_time(records: list[dict]) -> list[float]:
    """A resumed run restarts its clock at zero; chain the segments so the axis keeps growing."""
    out, offset, previous = [], 0.0, 0.0
    for record in records:
        t = float(record.get("wall_time_s", 0.0))
        if t < previous:
            offset += previous
        previous = t
        out.append(offset + t)
    return out


def _title(run: Path) -> str:
    """The model and the run folder; MDT's training objective sums two passes, so say which model."""
    folder = run if run.is_dir() else run.parent
    config = folder / "config.yaml"
    if config.is_file():
        import yaml

        try:
            settings = yaml.safe_load(config.read_bytes())
        except yaml.YAMLError:
            settings = None  # a damaged config.yaml costs the title its model name, not the plot
        model = settings.get("model") if isinstance(settings, dict) else None
        if model:
            return f"{model}: {folder.resolve().name}"
    return folder.resolve().name


def plot_losses(run: Path, out: Path, title: str | None = None) -> dict:
    """Training and validation loss against steps and against wall-clock, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no screen on a cluster node
    import matplotlib.pyplot as plt

    records = read_log(run)
    wall = cumulative_wall_time(records)
    train = [(r["step"], w / 60, r["loss"]) for r, w in zip(records, wall, strict=True) if "loss" in r]
    val = [(r["step"], w / 60, r["val_loss"]) for r, w in zip(records, wall, strict=True) if "val_loss" in r]
    if not train:
        raise UserError(f"{run} has no logged training step yet; plot after the first --log-every steps")
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for axis, column, label in ((axes[0], 0, "step"), (axes[1], 1, "wall-clock (min)")):
        axis.plot([p[column] for p in train], [p[2] for p in train], label="training objective", lw=1.2)
        if val:
            axis.plot([p[column] for p in val], [p[2] for p in val], "o-", label="validation denoising loss", ms=3)
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("loss")
    axes[0].set_yscale("log")
    axes[1].legend()
    figure.suptitle(title or _title(run))
    figure.tight_layout()
    with atomic_path(out) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
    return {"train_points": len(train), "val_points": len(val), "last_step": train[-1][0]}
