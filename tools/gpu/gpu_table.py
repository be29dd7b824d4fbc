"""The short table tools/gpu/gpu_check.sh ends with: its JSON lines, against the GPU targets.

    python tools/gpu/gpu_table.py OUT        # OUT: the folder gpu_check.sh wrote
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Issue targets on one H100/H200 at XL/2, 256 px, bf16, ZeRO-2, whole steps with AdamW and EMA.
TARGET_IMAGES_PER_S = {"DiT-XL/2": 400, "MaskDiT-XL/2": 800, "MDTv2-XL/2": 220}
TARGET_OVERHEAD = 1.15


def read(out: Path, part: str) -> list[dict]:
    path = out / f"{part}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def figures(records: list[dict], figure: str) -> dict[str, dict]:
    return {r["model"]: r for r in records if r.get("figure") == figure and "model" in r}


def cell(value, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def main() -> None:
    out = Path(sys.argv[1])
    env = (out / "environment.txt").read_text().strip() if (out / "environment.txt").is_file() else "?"
    print(f"machine: {env}")
    zero2 = read(out, "train_zero2")
    steps, parts = figures(zero2, "train_step"), figures(zero2, "step_parts")
    zero1 = figures(read(out, "train_zero1"), "train_step")
    compiled = figures(read(out, "train_compiled"), "train_step")
    compiled_parts = figures(read(out, "train_compiled"), "step_parts")
    batch64 = figures(read(out, "train_batch64"), "train_step")
    checkpointing = figures(read(out, "train_checkpointing"), "train_step")
    bare = {r["model"]: r for r in read(out, "bench_model") if r.get("figure") == "model_pass"
            and r["mask_ratio"] == (0.5 if r["model"].startswith("MaskDiT") else 0.0)}
    header = ("model", "img/s", "target", "step/bare", "compiled", "step/bare c", "ZeRO-1", "b64 img/s",
              "GB b32", "GB b64", "GB ckpt", "fwd+bwd img/s")
    rows = [header]
    for model in sorted(set(steps) | set(compiled) | set(bare)):
        step = steps.get(model, {})
        rows.append((
            model, cell(step.get("images_per_s")), str(TARGET_IMAGES_PER_S.get(model, "-")),
            cell(parts.get(model, {}).get("overhead_over_bare"), "{:.2f}"),
            cell(compiled.get(model, {}).get("images_per_s")),
            cell(compiled_parts.get(model, {}).get("overhead_over_bare"), "{:.2f}"),
            cell(zero1.get(model, {}).get("images_per_s")), cell(batch64.get(model, {}).get("images_per_s")),
            cell(step.get("peak_memory_gb")), cell(batch64.get(model, {}).get("peak_memory_gb")),
            cell(checkpointing.get(model, {}).get("peak_memory_gb")), cell(bare.get(model, {}).get("images_per_s")),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True)))
    print(f"targets: images/s as listed; step/bare <= {TARGET_OVERHEAD}")
    for record in read(out, "attention"):
        if record.get("figure") == "attention":
            print(f"attention {record['backend']:8s} {record['pass']:16s} {record['ms']:.3f} ms")
    tests = out / "test_cuda.log"
    if tests.is_file():
        print("tests/test_cuda.py:", tests.read_text().strip().splitlines()[-1])


if __name__ == "__main__":
    main()
