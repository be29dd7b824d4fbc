"""Per-sample draws (mdt.draws): a micro-batch's rows equal those of the whole global batch, however
it is split, and a plain generator draws exactly what the torch call draws."""

from __future__ import annotations

import torch

from mdt import draws
from mdt.diffusion.edm import EDMConfig, EDMObjective
from mdt.draws import SampleDraws


def split(total: int, micro: int, seed: int = 0) -> list[SampleDraws]:
    return [SampleDraws(torch.Generator().manual_seed(seed), first, total, torch.Generator().manual_seed(first))
            for first in range(0, total, micro)]


def test_the_rows_of_every_split_are_the_whole_batchs() -> None:
    for fn in (lambda s, b: draws.randn(s, (b, 3, 2)), lambda s, b: draws.rand(s, (b, 5)),
               lambda s, b: draws.randint(s, 7, (b,))):
        whole = fn(split(8, 8)[0], 8)
        for micro in (1, 2, 4):
            parts = [fn(source, micro) for source in split(8, micro)]
            assert torch.equal(torch.cat(parts), whole)


def test_a_plain_generator_draws_what_torch_draws() -> None:
    assert torch.equal(draws.randn(torch.Generator().manual_seed(3), (4, 2)), torch.randn(4, 2, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(draws.randint(torch.Generator().manual_seed(3), 9, (4,)),
                       torch.randint(0, 9, (4,), generator=torch.Generator().manual_seed(3)))


class Affine(torch.nn.Module):
    """A fixed function of every input the draws affect (noisy input, sigma, labels)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x, t, labels, mask=None):
        return x * self.scale * (1 + t.view(-1, 1, 1, 1)) + labels.view(-1, 1, 1, 1) * 0.1


def test_an_objectives_loss_does_not_depend_on_the_split() -> None:
    """MaskDiT's EDM loss (sigma, noise, label dropout, a 50% mask) of one global batch of 4 from
    micro-batches of 1, 2 or 4: the same per-sample values, so the same mean."""
    objective = EDMObjective(EDMConfig(), num_classes=3, grid_size=2, patch_size=2, mask_ratio=0.5, mae_weight=0.1)
    x0, y, model = torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 0]), Affine()

    def loss(micro: int) -> torch.Tensor:
        return torch.stack([objective(model, x0[s.first : s.first + micro], y[s.first : s.first + micro], s).loss
                            for s in split(4, micro, seed=5)]).mean()

    whole = loss(4)
    assert torch.allclose(loss(1), whole) and torch.allclose(loss(2), whole)
    other_seed = objective(model, x0, y, split(4, 4, seed=6)[0]).loss
    assert not torch.allclose(other_seed, whole)
