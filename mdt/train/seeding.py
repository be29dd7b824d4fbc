"""Seeds of the training randomness: one integer mixed from a few (e.g. seed, step, micro-batch, rank)."""

from __future__ import annotations

import numpy as np


def mix_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (numpy's SeedSequence hashing); the same parts give the same seed."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)
