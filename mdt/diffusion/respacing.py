"""Which timesteps a respaced sampler visits: ADM's `space_timesteps`, used by DiT, MDT and MaskDM.

A spec is a string: "N" (N steps spread evenly over the whole process), "a,b,c" (the process cut
into equal sections, a, b and c steps in each), or "ddimN" (the fixed integer stride of the DDIM
paper that gives exactly N steps: 0, s, 2s, ...). The result is sorted ascending.
"""

from __future__ import annotations

SPACINGS = ("even", "ddim")


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
    """`steps` timesteps by the named spacing: "even" is ADM's "N", "ddim" its "ddimN"."""
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps}, got {steps}")
    return space_timesteps(num_timesteps, str(steps) if spacing == "even" else f"ddim{steps}")
