"""Attention with a relative-position bias, per backend: seconds per forward(+backward) at one shape.

The shape defaults to XL/2 at 256 px (batch 32, 16 heads, 256 tokens, head width 72) with the
(H, N, N) bias MDT's blocks share over the batch, which needs gradients when training. Backends:
SDPA, xformers (when its kernels run on this device), FlexAttention; the forward alone and with
its backward (FlexAttention has no CPU backward). One JSON line per backend and pass, then the
ratios to SDPA.

    python tools/benchmarks/bench_attention.py --device cuda --precision bf16
    python tools/benchmarks/bench_attention.py --batch 2 --tokens 64             # CPU, forward + SDPA backward
"""

from __future__ import annotations

import argparse

import torch

from benchmark_utils import emit, machine, time_call
from mdt.models.attention import attention, xformers_usable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", "--precision", dest="dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--head-dim", type=int, default=72)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, args.heads, args.tokens, args.head_dim)
    q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=dtype).requires_grad_() for _ in range(3))
    bias = torch.randn(args.heads, args.tokens, args.tokens, generator=gen, device=device, dtype=dtype)
    bias.requires_grad_()
    backends = ["sdpa", "flex"] + (["xformers"] if xformers_usable(device) else [])
    emit({"figure": "attention_shape", "batch": args.batch, "heads": args.heads, "tokens": args.tokens,
          "head_dim": args.head_dim, "dtype": args.dtype, "backends": backends, **machine()})
    seconds: dict[tuple[str, str], float] = {}
    for backend in backends:
        def forward(backend: str = backend) -> None:
            with torch.no_grad():
                attention(q, k, v, bias, backend)

        def forward_backward(backend: str = backend) -> None:
            attention(q, k, v, bias, backend).float().sum().backward()

        passes = {"forward": forward}
        if not (backend == "flex" and device.type == "cpu"):  # no CPU backward for FlexAttention
            passes["forward_backward"] = forward_backward
        for mode, run in passes.items():
            seconds[backend, mode] = time_call(run, device, warmup=args.warmup, repeats=args.repeats)
            emit({"figure": "attention", "backend": backend, "pass": mode, "ms": round(seconds[backend, mode] * 1e3, 3)})
    for (backend, mode), value in seconds.items():
        if backend != "sdpa":
            emit({"figure": "attention_ratio", "ratio": f"{backend}/sdpa", "pass": mode,
                  "time_ratio": round(value / seconds["sdpa", mode], 3)})


if __name__ == "__main__":
    main()
