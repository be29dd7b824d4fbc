"""Which timesteps a respaced sampler visits: ADM's `space_timesteps` (DiT, MDT), or MaskDM's grid.

A spec is a string: "N" (N steps spread evenly over the whole process), "a,b,c" (the process cut
into equal sections, a, b and c steps in each), or "ddimN" (the fixed integer stride of the DDIM
paper that gives exactly N steps: 0, s, 2s, ...). The "linspace" spacing is the grid of MaskDM's
`ddim_sample` (lucidrains' denoising-diffusion-pytorch): linspace(-1, T-1, N+1) in float32,
truncated to integers, without the -1; with 250 of 1000 steps that is 3, 7, ..., 999, where ADM's
"250" is 0, 4, ..., 996. The result is sorted ascending.
"""

from __future__ import annotations

import torch

SPACINGS = ("even", "ddim", "linspace")


def linspace_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """MaskDM's DDIM grid, computed as it computes it (torch float32 linspace, then int truncation)."""
    grid = torch.linspace(-1, num_timesteps - 1, steps=steps + 1).int().tolist()
    return sorted(set(grid[1:]))


def space_timesteps(num_timesteps: int, spec: str) -> list[int]:
    """The original-timeline timesteps to keep, as ADM computes them (float stride, rounded)."""
    if spec.startswith("ddim"):
        count = int(spec[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == count:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"no integer stride gives exactly {count} of {num_timesteps} steps; use even spacing")
    counts = [int(part) for part in spec.split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            steps.append(start + round(position))  # the stride accumulates, as in ADM, then rounds half to even
            position += stride
        start += size
    return sorted(set(steps))


def sampling_timesteps(num_timesteps: int, steps: int, spacing: str = "even") -> list[int]:
    """`steps` timesteps by the named spacing: "even" is ADM's "N", "ddim" its "ddimN", "linspace" MaskDM's."""
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps}, got {steps}")
    if spacing == "linspace":
        return linspace_timesteps(num_timesteps, steps)
    return space_timesteps(num_timesteps, str(steps) if spacing == "even" else f"ddim{steps}")
