"""Guidance weights, the guided combination, and the guidance wrapper."""

from __future__ import annotations

import math

import pytest
import torch

from mdt.sample.guidance import ClassifierFreeGuidance, GuidanceConfig, combine_guided, guidance_weight


@pytest.mark.parametrize("power", [1.0, 4.0, 0.5])
def test_power_cosine_weights_match_the_formula(power: float) -> None:
    scale, T = 3.8, 1000
    t = torch.tensor([0, 1, 250, 500, 999, 1000])
    got = guidance_weight(t, T, GuidanceConfig(scale=scale, schedule="power-cosine", power=power))
    for ti, wi in zip(t.tolist(), got.tolist(), strict=True):
        expected = 1 + (scale - 1) * (1 - math.cos(math.pi * (1 - ti / T) ** power)) / 2
        assert wi == pytest.approx(expected, abs=1e-12)
    # The ramp: no guidance at t = T, full scale at t = 0.
    assert got[-1].item() == pytest.approx(1.0)
    assert got[0].item() == pytest.approx(scale)


def test_constant_weights() -> None:
    w = guidance_weight(torch.tensor([0, 500, 999]), 1000, GuidanceConfig(scale=1.5))
    assert w.tolist() == [1.5, 1.5, 1.5]


def test_combine_guides_only_the_chosen_channels() -> None:
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    w = torch.tensor([2.0, 3.0])
    out = combine_guided(cond, uncond, w, channels=3)
    expected = uncond[:, :3] + w.view(-1, 1, 1, 1) * (cond[:, :3] - uncond[:, :3])
    torch.testing.assert_close(out[:, :3], expected)
    assert torch.equal(out[:, 3:], cond[:, 3:])
    torch.testing.assert_close(combine_guided(cond, uncond, torch.ones(2), channels=None), cond)


class _Toy(torch.nn.Module):
    """Obeys the model contract: (x, t, y) -> (B, 2C, H, W); depends on the class and the timestep."""

    def __init__(self, channels: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(num_classes + 1, 2 * channels)
        self.calls = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        scale = 1 + t.float().view(-1, 1, 1, 1) / 1000
        return torch.cat([x, -x], dim=1) * scale + self.embed(y)[:, :, None, None]


def test_wrapper_guides_eps_and_keeps_conditional_variance() -> None:
    torch.manual_seed(0)
    model = _Toy()
    guided = ClassifierFreeGuidance(model, GuidanceConfig(scale=4.0), null_class=10, num_timesteps=1000,
                                    latent_channels=4)
    x, t, y = torch.randn(3, 4, 5, 5), torch.tensor([10, 500, 999]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        out = guided(x, t, y)
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
    torch.testing.assert_close(out[:, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]))
    torch.testing.assert_close(out[:, 4:], cond[:, 4:])


def test_scale_one_is_the_unguided_model_in_one_call() -> None:
    model = _Toy()
    guided = ClassifierFreeGuidance(model, GuidanceConfig(scale=1.0, schedule="power-cosine"), null_class=10,
                                    num_timesteps=1000, latent_channels=4)
    x, t, y = torch.randn(2, 4, 5, 5), torch.tensor([3, 700]), torch.tensor([0, 9])
    with torch.no_grad():
        assert torch.equal(guided(x, t, y), model(x, t, y))
    assert model.calls == 2  # one for the wrapper, one for the reference: no unconditional pass
