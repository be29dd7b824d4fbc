"""Parameter and FLOP counts of a preset: the one count `mdt models` prints and the benchmarks in
tools/ report (2 FLOPs per multiply-add, PyTorch's `FlopCounterMode`, attention included)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mdt.models.masking import random_mask
from mdt.models.registry import create_model


@dataclass(frozen=True)
class ModelStats:
    params: int
    forward_flops: int  # per image, 2 FLOPs per multiply-add
    backward_flops: int | None = None  # per image, when asked for


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of `fn()` with attention on SDPA's math kernel: the counter has no formula for the
    CPU's fused attention kernel and would count its attention as 0 FLOPs."""
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    return counter.get_total_flops()


def model_stats(name: str, mask_ratio: float = 0.0, *, backward: bool = False, routed: bool = False,
                **options) -> ModelStats:
    """Parameters and per-image FLOPs of one pass of preset `name` with `mask_ratio` of its tokens
    dropped, and of its backward pass (`backward`: a loss of the output, no gradient of the input);
    `routed`: a training pass along the model's TREAD routes (`options["routes"]`).
    An unmasked pass runs on the meta device (no memory, no time); a masked one on a CPU model,
    because the kept-token count is read from the mask's values, which the meta device lacks."""
    device = "cpu" if mask_ratio else "meta"
    with torch.device(device):
        model = create_model(name, **options).to(device)  # fixed buffers are built on the CPU
    cfg = model.config
    x = torch.zeros(1, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    mask = random_mask(1, cfg.grid_size, mask_ratio, generator=torch.Generator().manual_seed(0)) if mask_ratio else None
    routing = {"route_scores": [torch.rand(1, cfg.num_tokens, device=device) for _ in cfg.routes]} if routed else {}
    outputs = []

    def forward() -> None:
        with torch.set_grad_enabled(backward):
            outputs.append(model(x, t, t, mask, **routing).float().sum())

    forward_flops = count_flops(forward)
    backward_flops = count_flops(outputs[0].backward) if backward else None
    return ModelStats(sum(p.numel() for p in model.parameters()), forward_flops, backward_flops)
