"""What the world-size-free optimizer state (mdt.train.elastic) costs per checkpoint, next to DeepSpeed's
own save and load of the same state, in one run.

Builds a model preset under a DeepSpeed ZeRO engine, takes one optimizer step on random latents so every
optimizer state exists, then times, for each optimizer: DeepSpeed's save_checkpoint and load_checkpoint
(its per-rank partitions), and mdt's gather-and-write of the whole state and its read-and-scatter into a
fresh engine (what a resume on another world size does). One JSON line per figure, with the state's size
and seconds per GB. Runs on one process or under torchrun.

    python tools/benchmarks/bench_elastic.py --model DiT-S/2 --stage 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from mdt import distributed
from mdt.models import build_model, model_config
from mdt.train.config import DEFAULT_BETAS
from mdt.train.elastic import load_elastic_state, read_elastic_record, save_elastic_state
from mdt.train.engine import Engine, init_process_group, resolve_deepspeed_config
from mdt.train.optimizer import OptimizerConfig, build_optimizer


def make_engine(model_name: str, optimizer: str, stage: int) -> Engine:
    torch.manual_seed(0)
    model = build_model(model_config(model_name))
    opt = build_optimizer(model.parameters(), OptimizerConfig(name=optimizer, betas=DEFAULT_BETAS[optimizer]), 1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    config = resolve_deepspeed_config(f"deepspeed_configs/zero{stage}.json", micro_batch=2, grad_accum=1,
                                      world_size=distributed.get_world_size(), grad_clip=0.0, precision="fp32")
    config["zero_allow_untested_optimizer"] = optimizer != "adamw"
    return Engine(model, opt, scheduler, config)


def one_step(engine: Engine) -> None:
    cfg = engine.module.config
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size)
    out = engine(x, torch.randint(0, 1000, (2,)), torch.randint(0, cfg.num_classes, (2,)))
    engine.backward_and_step(out.float().pow(2).mean())


def timed(fn) -> float:
    distributed.barrier()
    start = time.perf_counter()
    fn()
    distributed.barrier()
    return time.perf_counter() - start


def size_gb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e9


def measure(model: str, optimizer: str, stage: int, root: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds of each save and load, and the GB each writes."""
    engine = make_engine(model, optimizer, stage)
    one_step(engine)
    seconds = {"deepspeed_save": timed(lambda: engine.save(root, "ds", {"step": 1})),
               "elastic_save": timed(lambda: save_elastic_state(engine, root / "elastic", {"step": 1}))}
    fresh = make_engine(model, optimizer, stage)
    seconds["deepspeed_load"] = timed(lambda: fresh.load(root, "ds"))
    record = read_elastic_record(root / "elastic")
    other = make_engine(model, optimizer, stage)
    seconds["elastic_load"] = timed(lambda: load_elastic_state(other, root / "elastic", record, 2))
    return seconds, {"deepspeed": size_gb(root / "ds"), "elastic": size_gb(root / "elastic")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--stage", type=int, default=2, choices=[1, 2, 3])
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "adan"])
    parser.add_argument("--dir", default=None, help="a folder every rank can reach (default: the temporary folder)")
    args = parser.parse_args()
    init_process_group()
    folder = [tempfile.mkdtemp(dir=args.dir) if distributed.is_main() else ""]
    torch.distributed.broadcast_object_list(folder)  # one folder for every rank (each writes its partition)
    try:
        for name in args.optimizers:
            seconds, sizes = measure(args.model, name, args.stage, Path(folder[0]) / name)
            if not distributed.is_main():
                continue
            for what, s in seconds.items():
                gb = sizes[what.split("_")[0]]
                print(json.dumps({"model": args.model, "optimizer": name, "zero_stage": args.stage,
                                  "world_size": distributed.get_world_size(), "what": what, "seconds": round(s, 3),
                                  "gb": round(gb, 3), "s_per_gb": round(s / gb, 2)}), flush=True)
    finally:
        distributed.barrier()
        if distributed.is_main():
            shutil.rmtree(folder[0], ignore_errors=True)


if __name__ == "__main__":
    main()
