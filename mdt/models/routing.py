"""TREAD token routing (Krause et al. 2025, CompVis/tread `routing_module.py`, `dit.py`): in training,
a random share of the tokens skips a span of blocks and rejoins unchanged after it.

Just before block `start` the sequence is saved and the kept tokens gathered; blocks `start`..`end`
run on them only; just after block `end` their outputs are scattered into the saved sequence, so the
routed tokens come back as they were before `start`. The one block after each rejoin runs with CUDA
autocast off (fp32), as the official code does (a no-op on the CPU). Which tokens are kept comes from
uniform scores the objective draws (argsort, the first n - int(n x ratio)), so the model draws no
random numbers and a seeded trainer repeats them exactly.
"""

from __future__ import annotations

import contextlib

import torch

from mdt import draws
from mdt.models.config import Route


def paper_route(depth: int, ratio: float = 0.5) -> Route:
    """TREAD's route placement for a model of `depth` blocks: the project page's "absolute scaling"
    (blocks 2 to depth - 4: B/2's 2 to 8, XL/2's 2 to 24); models shallower than 8 blocks route
    blocks 1 to depth - 2 (the rule leaves them no span)."""
    return Route(ratio, 2, depth - 4) if depth >= 8 else Route(ratio, 1, depth - 2)


def kept_by_route(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """(B, n) uniform scores -> (B, n - int(n x ratio)) indices of the tokens that take the route's blocks."""
    n = scores.shape[1]
    return torch.argsort(scores, dim=1)[:, : n - int(n * ratio)]


def draw_route_scores(num_routes: int, batch: int, tokens: int, generator: torch.Generator | None,
                      device: torch.device) -> list[torch.Tensor]:
    """Per route, a (B, tokens) uniform score per grid token; a masked model ranks its visible tokens by
    theirs (uniform scores of a subset are uniform too)."""
    return [draws.rand(generator, (batch, tokens)).to(device) for _ in range(num_routes)]


class Router:
    """Walks the blocks of one forward pass: call `before(i, x)` and `after(i, x)` around block i."""

    def __init__(self, routes: tuple[Route, ...], scores: list[torch.Tensor] | None):
        self.pending = list(zip(routes, scores, strict=True)) if scores is not None else []
        self.saved: torch.Tensor | None = None
        self.kept: torch.Tensor | None = None
        self.fp32_next = False

    def before(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.pending and i == self.pending[0][0].start:
            route, scores = self.pending[0]
            self.saved, self.kept = x, kept_by_route(scores, route.ratio)
            return x.gather(1, self.kept[:, :, None].expand(-1, -1, x.shape[-1]))
        return x

    def after(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.pending and i == self.pending[0][0].end:
            self.pending.pop(0)
            x = self.saved.scatter(1, self.kept[:, :, None].expand(-1, -1, x.shape[-1]), x)  # out of place
            self.saved = self.kept = None
            self.fp32_next = True
        return x

    def block_context(self, x: torch.Tensor) -> contextlib.AbstractContextManager:
        """CUDA autocast off for the block after a rejoin (official: autocast(device_type="cuda", enabled=False))."""
        fp32, self.fp32_next = self.fp32_next, False
        return torch.autocast("cuda", enabled=False) if fp32 and x.is_cuda else contextlib.nullcontext()
