"""Random draws of a training step that do not depend on how its global batch is split.

A micro-batch's timesteps, noise, label dropout, masks and routes are drawn through `SampleDraws`:
each draw is made for the whole global batch from a generator seeded by (seed, step), and the
micro-batch keeps its rows. So sample i of step s gets the same values on 1 or 64 ranks, with or
without accumulation, and with any micro-batch size. Draws made once per forward pass (MDTv2's mask
ratio, as the official code draws it) come from a second generator keyed by the micro-batch's index
in the global batch: the same whenever the micro-batch size is.

Every draw site takes a plain `torch.Generator` too (validation, sampling, the golden tests): the
functions below then draw exactly what the torch call would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SampleDraws:
    """`generator` draws for `total` samples; this micro-batch holds rows first .. first + batch - 1."""

    generator: torch.Generator
    first: int
    total: int
    per_forward: torch.Generator  # for the draws made once per forward pass

    @property
    def device(self) -> torch.device:
        return self.generator.device

    def rows(self, draw, shape: tuple[int, ...]) -> torch.Tensor:
        """`draw(full_shape)` for the global batch, then this micro-batch's rows (shape[0] of them)."""
        full = draw((self.total, *shape[1:]))
        return full[self.first : self.first + shape[0]]


Source = torch.Generator | SampleDraws | None


def device_of(source: Source) -> torch.device:
    return source.device if source is not None else torch.device("cpu")


def randn(source: Source, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal values of `shape` (its first dimension the batch) on the source's device."""
    if isinstance(source, SampleDraws):
        return source.rows(lambda s: torch.randn(s, generator=source.generator, device=source.device), tuple(shape))
    return torch.randn(tuple(shape), generator=source, device=device_of(source))


def rand(source: Source, shape: tuple[int, ...]) -> torch.Tensor:
    """Uniform [0, 1) values of `shape` (its first dimension the batch)."""
    if isinstance(source, SampleDraws):
        return source.rows(lambda s: torch.rand(s, generator=source.generator, device=source.device), tuple(shape))
    return torch.rand(tuple(shape), generator=source, device=device_of(source))


def randint(source: Source, high: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Integers in [0, high) of `shape` (its first dimension the batch)."""
    if isinstance(source, SampleDraws):
        return source.rows(lambda s: torch.randint(0, high, s, generator=source.generator, device=source.device),
                           tuple(shape))
    return torch.randint(0, high, tuple(shape), generator=source, device=device_of(source))


def rand_per_forward(source: Source) -> torch.Tensor:
    """One uniform scalar for the whole forward pass (not per sample)."""
    generator = source.per_forward if isinstance(source, SampleDraws) else source
    return torch.rand((), generator=generator, device=device_of(generator))
