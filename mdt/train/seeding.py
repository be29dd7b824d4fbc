"""Seeds of the training randomness: one integer mixed from a few (seed, step, ...), and a step's draws."""

from __future__ import annotations

import numpy as np
import torch

from mdt.draws import SampleDraws

_SAMPLE_DRAWS, _FORWARD_DRAWS = 1, 2  # distinct streams (numpy pads short entropy with zeros)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (numpy's SeedSequence hashing); the same parts give the same seed."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def step_draws(seed: int, step: int, index_in_step: int, micro_batch: int, global_batch: int,
               device: torch.device) -> SampleDraws:
    """The randomness of micro-batch `index_in_step` of `step`: per sample, keyed by (seed, step, position
    in the global batch); per forward pass, by (seed, step, micro-batch index). Never by rank."""
    samples = torch.Generator(device=device).manual_seed(mix_seed(seed, _SAMPLE_DRAWS, step))
    per_forward = torch.Generator(device=device).manual_seed(mix_seed(seed, _FORWARD_DRAWS, step, index_in_step))
    return SampleDraws(samples, index_in_step * micro_batch, global_batch, per_forward)
