"""Sampling throughput of each sampler, guided: images/s and network evaluations per image.

Times the real sampling path (ClassifierFreeGuidance around the model, the diffusers-based
samplers, per-sample generators) on a random-init model: throughput does not depend on the
weights. The VAE decode is left out (it is the same for every sampler). Also times bare model
forwards of the guided batch shape, so each sampler's overhead beyond the network shows as a ratio.
Prints one JSON line per figure, all measured in this one process run.

    python tools/benchmarks/bench_sample.py                                  # CPU: S/2, batch 4, 10 steps
    python tools/benchmarks/bench_sample.py --device cuda --model DiT-XL/2 --batch 32 --precision bf16 --steps 50
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmark_utils import emit, machine, synchronize, time_call
from mdt.diffusion.respacing import sampling_timesteps
from mdt.diffusion.schedule import ScheduleConfig
from mdt.models import create_model
from mdt.precision import PRECISIONS, autocast, sampling_mode
from mdt.sample.guidance import ClassifierFreeGuidance, GuidanceConfig
from mdt.sample.samplers import SAMPLERS
from mdt.sample.seeding import initial_noise, noise_generators, per_sample_noise


class CountingModel(torch.nn.Module):
    """Counts network evaluations (rows through the model), the cost unit of a sampler."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.rows = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        return self.model(x, t, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    parser.add_argument("--steps", type=int, default=10, help="Steps for every sampler (same cost basis).")
    parser.add_argument("--batch", type=int, default=4, help="Images per sampler call.")
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--input-size", type=int, default=32, help="Latent side (32 for 256 px).")
    parser.add_argument("--precision", default="fp32", choices=[p for p in PRECISIONS if p != "auto"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device, precision = torch.device(args.device), sampling_mode(args.precision)
    diffusion = ScheduleConfig()
    model = create_model(args.model, input_size=args.input_size).to(device).eval()
    counter = CountingModel(model)
    cfg = model.config
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    guided = ClassifierFreeGuidance(counter, GuidanceConfig(scale=args.cfg_scale), null_class=cfg.num_classes,
                                    num_timesteps=diffusion.num_timesteps, latent_channels=cfg.in_channels)
    labels = torch.arange(args.batch, device=device) % cfg.num_classes
    common = dict(model=args.model, batch=args.batch, cfg_scale=args.cfg_scale, precision=args.precision,
                  device=device.type, **machine())
    emit({"figure": "config", **common})

    rows = 2 * args.batch if args.cfg_scale != 1.0 else args.batch
    x = torch.randn(rows, *shape, device=device)
    t = torch.full((rows,), 500, device=device)
    y = torch.arange(rows, device=device) % cfg.num_classes

    def forward() -> None:
        with torch.no_grad(), autocast(precision, device):
            model(x, t, y)

    forward_s = time_call(forward, device, warmup=1, repeats=3)
    emit({"figure": "guided_forward", "seconds": round(forward_s, 4), "rows": rows, **common})

    for name in args.samplers:
        gens = noise_generators(0, list(range(args.batch)))
        noise = initial_noise(gens, shape).to(device)

        def run(steps: int, name: str = name, gens: list = gens, noise: torch.Tensor = noise) -> None:
            with autocast(precision, device):
                SAMPLERS[name](guided, noise, labels, diffusion=diffusion, step_noise=per_sample_noise(gens),
                               timesteps=sampling_timesteps(diffusion.num_timesteps, steps))

        run(2)  # warm up kernels and the scheduler construction path
        counter.rows = 0
        synchronize(device)
        start = time.perf_counter()
        run(args.steps)
        synchronize(device)
        seconds = time.perf_counter() - start
        nfe = counter.rows / args.batch
        emit({
            "figure": "sampler", "sampler": name, "steps": args.steps,
            "images_per_s": round(args.batch / seconds, 4),
            "nfe_per_image": nfe,
            "seconds": round(seconds, 3),
            # > 1: time spent outside the network (scheduler, guidance arithmetic, noise draws).
            "time_vs_bare_forwards": round(seconds / (forward_s * nfe * args.batch / rows), 3),
            **common,
        })


if __name__ == "__main__":
    main()
