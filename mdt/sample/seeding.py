"""Per-sample randomness: sample i draws everything from generators seeded by (seed, i) alone.

That is what makes a run independent of the batch size, the number of processes and resumption:
no sample ever reads from a stream another sample has advanced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mdt.errors import UserError

# Independent streams per sample: one for the class draw, one for the diffusion noise chain.
_NOISE_STREAM = 0
_LABEL_STREAM = 1


def derived_seed(seed: int, index: int, stream: int) -> int:
    """A well-mixed 63-bit seed for (seed, index, stream); stable across numpy versions."""
    state = np.random.SeedSequence(entropy=seed, spawn_key=(index, stream)).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def noise_generators(seed: int, indices: list[int]) -> list[torch.Generator]:
    """One CPU generator per sample: its initial noise and (for ancestral samplers) every later draw."""
    return [torch.Generator("cpu").manual_seed(derived_seed(seed, i, _NOISE_STREAM)) for i in indices]


def initial_noise(generators: list[torch.Generator], shape: tuple[int, int, int]) -> Tensor:
    """x_T for each sample, (B, C, H, W), drawn on the CPU so every device gives the same numbers."""
    return torch.cat([torch.randn((1, *shape), generator=g) for g in generators])


def per_sample_noise(generators: list[torch.Generator]) -> Callable[[Tensor], Tensor]:
    """A sampler's `step_noise`: each step's noise for sample i from sample i's own generator."""
    def draw(like: Tensor) -> Tensor:
        return torch.cat([torch.randn((1, *like.shape[1:]), generator=g) for g in generators]).to(like.device)
    return draw


ClassMode = Literal["random", "balanced"]


def parse_classes(spec: str, num_classes: int) -> ClassMode | list[int]:
    """`random`, `balanced`, or a comma list of class indices such as `207,980`."""
    if spec in ("random", "balanced"):
        return spec
    try:
        classes = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise UserError(
            f"--classes {spec!r} is not understood; pass random, balanced, or class indices like 207,980."
        ) from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if not classes or bad:
        raise UserError(
            f"--classes {spec!r} names classes outside 0..{num_classes - 1}; pick indices the model was trained on."
        )
    return classes


def class_labels(classes: ClassMode | list[int], seed: int, indices: list[int], num_classes: int) -> list[int]:
    """The class of each sample index: drawn from its own stream, cycled over all classes, or cycled over a list.
    An unconditional model (no classes) gets label 0 everywhere, which it ignores."""
    if num_classes == 0:
        return [0] * len(indices)
    if classes == "random":
        return [
            int(np.random.default_rng(derived_seed(seed, i, _LABEL_STREAM)).integers(num_classes)) for i in indices
        ]
    if classes == "balanced":
        return [i % num_classes for i in indices]
    return [classes[i % len(classes)] for i in indices]
