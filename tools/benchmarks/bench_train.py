"""Images/s of a whole training step (forward, backward, optimizer, EMA) per model family.

Runs the real pieces: the family's objective, the DeepSpeed engine (ZeRO stage from the config,
bf16 where asked), AdamW and the fp32 EMA, in one process. Prints JSON lines: the matmul peak, one
line per model (images/s, step seconds, FLOPs per image, achieved FLOP/s, fraction of the peak,
peak memory; FLOPs counted as `mdt models` counts them, attention included), where a step's time goes (forward, backward, optimizer, EMA, each timed on its own,
and the same forward+backward on the bare module without DeepSpeed), and the ratios the targets
are stated in, beside the ratios the FLOP counts allow.

    python tools/benchmarks/bench_train.py                                     # CPU, S/2, batch 8, fp32
    python tools/benchmarks/bench_train.py --device cuda --dtype bf16 --sizes S XL --batch 32

The flags are those of tools/benchmarks/bench_model.py (`make bench-train BENCH_ARGS=...`); `--precision` and
`--size` are accepted as aliases of `--dtype` and `--sizes`.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from benchmark_utils import (
    COMPILE_MODES,
    add_common_arguments,
    emit,
    machine,
    matmul_peak,
    pass_flops,
    step_pass_ratios,
    synchronize,
    time_call,
)
from mdt.diffusion import make_objective
from mdt.models import create_model
from mdt.train.ema import EMA
from mdt.train.engine import Engine, init_process_group, resolve_deepspeed_config
from mdt.train.optimizer import adamw

FAMILIES = ("DiT", "MDTv2", "MaskDiT")


def make_step(name: str, args, device: torch.device, compiled: bool):
    torch.manual_seed(0)
    model = create_model(name)
    model.set_activation_checkpointing(args.activation_checkpointing)
    bare = copy.deepcopy(model)  # the same weights without DeepSpeed, for the reference pass
    if compiled:  # both, so the engine's overhead is measured against a like pass
        model.compile(dynamic=None)
        bare.compile(dynamic=None)
    cfg = model.config
    objective = make_objective(cfg.family, num_classes=cfg.num_classes, grid_size=cfg.grid_size,
                               patch_size=cfg.patch_size, learn_sigma=cfg.learn_sigma)
    optimizer = adamw(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    ds_config = resolve_deepspeed_config(args.deepspeed_config, micro_batch=args.batch, grad_accum=1, world_size=1,
                                         grad_clip=1.0, precision=args.dtype)
    engine = Engine(model, optimizer, scheduler, ds_config)
    ema = EMA(engine.master_partitions(), 0.9999)
    gen = torch.Generator(device=engine.device).manual_seed(0)
    x0 = torch.randn(args.batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=engine.device)
    y = torch.randint(0, cfg.num_classes, (args.batch,), device=engine.device)

    def step():
        engine.backward_and_step(objective(engine, x0, y, gen).loss)
        ema.update(engine.master_partitions())

    def step_in_parts() -> dict[str, float]:
        """One step with a device sync between its parts: seconds of each."""
        marks = [time.perf_counter()]

        def mark():
            synchronize(engine.device)
            marks.append(time.perf_counter())

        loss = objective(engine, x0, y, gen).loss
        mark()
        engine.engine.backward(loss)
        mark()
        engine.engine.step()
        mark()
        ema.update(engine.master_partitions())
        mark()
        names = ("forward", "backward", "optimizer", "ema")
        return {name: marks[i + 1] - marks[i] for i, name in enumerate(names)}

    def bare_forward_backward_seconds() -> float:
        """Forward+backward of the same objective on the bare module, in the engine's dtype."""
        module = bare.to(engine.device, engine.dtype)

        def run():
            module.zero_grad(set_to_none=True)
            objective(module, x0, y, gen).loss.backward()

        seconds = time_call(run, engine.device, warmup=args.warmup, repeats=args.repeats)
        module.to("cpu")
        return seconds

    return engine, objective, step, step_in_parts, bare_forward_backward_seconds


def profile_step(step, device: torch.device, name: str, top: int) -> None:
    """Where one step's time goes: operators by self time on the device (CPU time on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    for event in events[:top]:
        emit({"figure": "profile", "model": name, "op": event.key[:80], "calls": event.count,
              "self_ms": round(getattr(event, key) / 1e3, 3), "share": round(getattr(event, key) / total, 4)})
    emit({"figure": "profile_total", "model": name, "self_ms": round(total / 1e3, 3)})


def bench_size(size: str, args, device: torch.device, peak: float) -> None:
    for compiled in COMPILE_MODES[args.compile]:
        bench_families(size, args, device, peak, compiled)


def bench_families(size: str, args, device: torch.device, peak: float, compiled: bool) -> None:
    results = {}
    for family in args.families:
        name = f"{family}-{size}/2"
        engine, objective, step, step_in_parts, bare_seconds = make_step(name, args, device, compiled)
        # forward + backward of every pass of the objective; the optimizer is negligible
        flops = sum(pass_flops(name, ratio) for ratio in step_pass_ratios(objective))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = time_call(step, device, warmup=args.warmup, repeats=args.repeats)
        memory = (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None
        results[family] = (seconds, flops)
        emit({"figure": "train_step", "model": name, "batch": args.batch, "precision": args.dtype,
              "zero_stage": engine.zero_stage, "compiled": compiled,
              "activation_checkpointing": args.activation_checkpointing,
              "device": device.type, "seconds_per_step": round(seconds, 4),
              "images_per_s": round(args.batch / seconds, 2), "gflops_per_image": round(flops / 1e9, 3),
              "achieved_tflops": round(flops * args.batch / seconds / 1e12, 4),
              "fraction_of_peak": round(flops * args.batch / seconds / peak, 3),
              "peak_memory_gb": None if memory is None else round(memory, 2)})
        parts = [step_in_parts() for _ in range(args.repeats)]
        median = {key: statistics.median(p[key] for p in parts) for key in parts[0]}
        bare = bare_seconds()
        emit({"figure": "step_parts", "model": name, "compiled": compiled,
              **{f"{k}_s": round(v, 4) for k, v in median.items()},
              "bare_forward_backward_s": round(bare, 4),
              # what the engine adds to a forward+backward of the bare module, optimizer and EMA included
              "overhead_over_bare": round(seconds / bare, 3)})
        if args.profile:
            profile_step(step, device, name, args.profile)
        del engine, step, step_in_parts, bare_seconds
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "DiT" in results:
        # The CPU target: every family's step within 10% of the FLOP/s of DiT's step in this run.
        dit_rate = results["DiT"][1] / results["DiT"][0]
        for family, (seconds, flops) in results.items():
            emit({"figure": "flops_efficiency_vs_dit", "model": f"{family}-{size}/2", "compiled": compiled,
                  "ratio": round(flops / seconds / dit_rate, 3)})
    if set(FAMILIES) <= set(results):
        dit, mdtv2, maskdit = (results[f] for f in FAMILIES)
        # The ratios the FLOP counts allow at equal efficiency, beside the measured ones.
        emit({"figure": "maskdit_over_dit_images_per_s", "size": size, "compiled": compiled, "ratio": round(dit[0] / maskdit[0], 3),
              "flop_ratio": round(dit[1] / maskdit[1], 3)})
        # MDTv2 runs two passes; its step should cost what its FLOPs say relative to DiT's.
        emit({"figure": "mdtv2_over_dit", "size": size, "compiled": compiled, "time_ratio": round(mdtv2[0] / dit[0], 3),
              "flop_ratio": round(mdtv2[1] / dit[1], 3)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, dtypes=["fp32", "bf16"], families=list(FAMILIES), warmup=2)
    parser.add_argument("--deepspeed-config", default="deepspeed_configs/zero2.json")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute each block's activations in backward (less memory)")
    parser.add_argument("--profile", type=int, default=0, metavar="K",
                        help="also profile one step and print its K most expensive operators (JSON lines)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.cuda.is_available = lambda: False  # keep DeepSpeed and the engine on the CPU path
    init_process_group()
    peak = matmul_peak(device, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    emit({"figure": "matmul_peak", "device": device.type, "dtype": args.dtype, "tflops": round(peak / 1e12, 4),
          **machine()})
    for size in args.sizes:
        bench_size(size, args, device, peak)


if __name__ == "__main__":
    main()
