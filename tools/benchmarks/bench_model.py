"""Forward+backward throughput of every model family, masked and unmasked, against a matmul peak.

Prints JSON lines: one `matmul_peak`, one line per (model, mask ratio) pass with seconds per step,
images/s, FLOPs per image (forward + backward, and the forward alone: the count `mdt models` prints,
attention included), achieved FLOP/s and its fraction of the peak,
ratio lines (MaskDiT masked vs unmasked, MDTv2 masked vs full against the token count, DiT with
TREAD's route routed vs full), and attention with vs without relative bias. Everything is measured in this one process run.

    python tools/benchmarks/bench_model.py                       # CPU: S/2, batch 8, fp32
    python tools/benchmarks/bench_model.py --device cuda --dtype bf16 --sizes S XL --batch 32

The flags are those of tools/benchmarks/bench_train.py (`make bench-model BENCH_ARGS=...`).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from benchmark_utils import (
    COMPILE_MODES,
    FAMILIES,
    add_common_arguments,
    emit,
    machine,
    matmul_peak,
    time_call,
)
from mdt.models import block_mask, create_model, model_config, random_mask
from mdt.models.attention import Attention, attention, resolve_backend
from mdt.models.routing import paper_route
from mdt.models.stats import count_flops, model_stats

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pass_fn(model, batch: int, ratio: float, device, dtype, routed: bool = False):
    cfg = model.config
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen).to(device, dtype)
    t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=gen).to(device)
    mask = random_mask(batch, cfg.grid_size, ratio, generator=gen, device=device) if ratio else None
    routing = {"route_scores": [torch.rand(batch, cfg.num_tokens, generator=gen).to(device) for _ in cfg.routes]
               } if routed else {}

    def step():
        model.zero_grad(set_to_none=True)
        model(x, t, y, mask, **routing).float().square().mean().backward()

    return step


def bench_models(args, device, dtype, peak: float) -> None:
    for size in args.sizes:
        for compiled in COMPILE_MODES[args.compile]:
            bench_size(args, device, dtype, peak, size, compiled)


def bench_size(args, device, dtype, peak: float, size: str, compiled: bool) -> None:
    results = {}
    for family in args.families:
        name = f"{family}-{size}/2"
        model = create_model(name).to(device, dtype)
        runner = torch.compile(model) if compiled else model
        ratios = (0.0,) if family == "DiT" else (0.0, 0.5)
        for ratio in ratios:
            stats = model_stats(name, ratio, backward=True)  # per image, as `mdt models` counts
            flops = stats.forward_flops + stats.backward_flops
            step = pass_fn(runner, args.batch, ratio, device, dtype)
            seconds = time_call(step, device, warmup=args.warmup, repeats=args.repeats)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                step()
            results[(family, ratio)] = (seconds, flops)
            record = {
                "figure": "model_pass", "model": name, "mask_ratio": ratio, "batch": args.batch,
                "dtype": args.dtype, "device": device.type, "seconds_per_step": round(seconds, 4),
                "compiled": compiled, "images_per_s": round(args.batch / seconds, 2),
                "gflops_per_image": round(flops / 1e9, 3),
                "forward_gflops_per_image": round(stats.forward_flops / 1e9, 3),
                "achieved_tflops": round(flops * args.batch / seconds / 1e12, 4),
                "fraction_of_peak": round(flops * args.batch / seconds / peak, 3),
            }
            if device.type == "cuda":
                record["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            emit(record)
        del model
    if "MaskDiT" in args.families:
        md0, md5 = results[("MaskDiT", 0.0)], results[("MaskDiT", 0.5)]
        emit({"figure": "maskdit_speedup", "size": size, "compiled": compiled,
              "masked_over_unmasked_images_per_s": round(md0[0] / md5[0], 3)})
    if "MDTv2" in args.families:
        v2_full, v2_masked = results[("MDTv2", 0.0)], results[("MDTv2", 0.5)]
        # The masked pass should cost what its FLOPs say: time ratio close to FLOP ratio.
        emit({"figure": "mdtv2_masked_vs_full", "size": size, "compiled": compiled,
              "time_ratio": round(v2_masked[0] / v2_full[0], 3),
              "flop_ratio": round(v2_masked[1] / v2_full[1], 3)})


def bench_routing(args, device, dtype, size: str) -> None:
    """DiT with TREAD's route (mdt.models.routing.paper_route): a routed training pass against the full
    pass of the same model, FLOPs counted and time measured."""
    name = f"DiT-{size}/2"
    route = dataclasses.asdict(paper_route(model_config(name).depth))
    model = create_model(name, routes=[route]).to(device, dtype)
    flops, steps = {}, {}
    for routed in (False, True):
        stats = model_stats(name, backward=True, routed=routed, routes=[route])
        flops[routed] = stats.forward_flops + stats.backward_flops
        steps[routed] = pass_fn(model, args.batch, 0.0, device, dtype, routed)
    # Interleaved, the fastest of each: load from other jobs falls on both alike.
    seconds = {routed: float("inf") for routed in steps}
    for repeat in range(args.repeats):
        for routed, step in steps.items():
            took = time_call(step, device, warmup=args.warmup if repeat == 0 else 0, repeats=1)
            seconds[routed] = min(seconds[routed], took)
    for routed in steps:
        emit({"figure": "routed_pass", "model": name, "routes": [route] if routed else [], "batch": args.batch,
              "dtype": args.dtype, "device": device.type, "seconds_per_step": round(seconds[routed], 4),
              "images_per_s": round(args.batch / seconds[routed], 2), "gflops_per_image": round(flops[routed] / 1e9, 3)})
    emit({"figure": "tread_routed_vs_full", "model": name, "route": route,
          "flop_ratio": round(flops[True] / flops[False], 3), "time_ratio": round(seconds[True] / seconds[False], 3)})


def bench_attention_bias(args, device, dtype) -> None:
    """Attention at S/2's shape (forward + backward), with and without a learnable shared bias:
    the core op alone, and the whole attention layer (projections included)."""
    b, heads, n, d = args.batch, 6, 256, 64
    gen = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_()

    q, k, v = leaf(b, heads, n, d), leaf(b, heads, n, d), leaf(b, heads, n, d)
    bias = leaf(heads, n, n)
    layer = Attention(heads * d, heads).to(device, dtype)
    x = leaf(b, n, heads * d)
    steps = {
        "core": lambda bias_arg: attention(q, k, v, bias_arg).float().sum().backward(),
        "layer": lambda bias_arg: layer(x, bias_arg).float().sum().backward(),
    }
    for scope, step in steps.items():
        plain = time_call(lambda step=step: step(None), device, warmup=args.warmup, repeats=args.repeats * 3)
        biased = time_call(lambda step=step: step(bias), device, warmup=args.warmup, repeats=args.repeats * 3)
        emit({"figure": "attention_bias_overhead", "scope": scope, "backend": resolve_backend(None, device),
              "shape": [b, heads, n, d], "dtype": args.dtype, "seconds_no_bias": round(plain, 5),
              "seconds_with_bias": round(biased, 5), "bias_over_no_bias": round(biased / plain, 3)})


def bench_maskdm(args, device, dtype, peak: float) -> None:
    """MaskDM's pre-training pass (90% of 4x4-patch blocks dropped, pixels, unconditional) against
    its unmasked pass: FLOPs and images/s in one run."""
    torch.manual_seed(0)
    model = create_model(args.maskdm, input_size=args.maskdm_resolution).to(device, dtype)
    cfg = model.config
    x = torch.randn(args.batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    results = {}
    for ratio in (0.0, 0.9):
        mask = (block_mask(args.batch, cfg.grid_size, ratio, block=4, generator=torch.Generator().manual_seed(0),
                           device=device) if ratio else None)

        def step(batch: int = args.batch, mask=mask) -> None:
            model.zero_grad(set_to_none=True)
            model(x[:batch], t[:batch], None, None if mask is None else mask[:batch]).float().square().mean().backward()

        flops = count_flops(lambda step=step: step(1))
        seconds = time_call(step, device, warmup=args.warmup, repeats=args.repeats)
        results[ratio] = (seconds, flops)
        emit({"figure": "maskdm_pass", "model": cfg.name, "input": [cfg.in_channels, cfg.input_size, cfg.input_size],
              "mask_ratio": ratio, "mask": "block 4x4" if ratio else None,
              "kept_tokens": int((~mask[0]).sum()) if ratio else cfg.num_tokens, "batch": args.batch,
              "dtype": args.dtype, "seconds_per_step": round(seconds, 4), "images_per_s": round(args.batch / seconds, 3),
              "gflops_per_image": round(flops / 1e9, 3),
              "fraction_of_peak": round(flops * args.batch / seconds / peak, 3)})
    (full_s, full_f), (masked_s, masked_f) = results[0.0], results[0.9]
    emit({"figure": "maskdm_speedup", "model": cfg.name, "masked_over_unmasked_images_per_s": round(full_s / masked_s, 3),
          "flop_ratio": round(full_f / masked_f, 3)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, dtypes=list(DTYPES), families=list(FAMILIES), warmup=1)
    parser.add_argument("--maskdm", metavar="MODEL", help="also MaskDM's 90%%-masked pre-training pass against "
                        "the unmasked one, e.g. UViT-S/4 (pixels, so give --maskdm-resolution)")
    parser.add_argument("--maskdm-resolution", type=int, default=64, metavar="PX")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    peak = matmul_peak(device, dtype)
    emit({"figure": "matmul_peak", "device": device.type, "dtype": args.dtype, "tflops": round(peak / 1e12, 4),
          **machine()})
    bench_attention_bias(args, device, dtype)
    bench_models(args, device, dtype, peak)
    if "DiT" in args.families:
        for size in args.sizes:
            bench_routing(args, device, dtype, size)
    if args.maskdm:
        bench_maskdm(args, device, dtype, peak)


if __name__ == "__main__":
    main()
