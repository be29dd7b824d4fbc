"""Samplers on a tiny random-weight model: shapes, per-sample independence, guidance off = unguided;
DDIM and DPM-Solver++ against float64 references written out here, on the exact denoiser of
Gaussian data. (The DDPM and DDIM trajectories against the official code are in test_official_golden.py.)"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import run_python
from model_helpers import randomize
from sample_helpers import NUM_CLASSES

from mdt.diffusion.edm import EDMConfig, karras_sigmas
from mdt.diffusion.respacing import sampling_timesteps
from mdt.diffusion.schedule import ScheduleConfig
from mdt.models import create_model
from mdt.sample.guidance import ClassifierFreeGuidance, GuidanceConfig
from mdt.sample.samplers import EDM_SAMPLERS, IMAGENET_CHURN, SAMPLERS, sample_ddim, sample_dpmpp
from mdt.sample.seeding import class_labels, derived_seed, initial_noise, noise_generators, per_sample_noise

SHAPE = (4, 8, 8)
DDPM_SAMPLERS = sorted(set(SAMPLERS) - set(EDM_SAMPLERS))


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    """A DDPM model (DiT, learned sigma) and an EDM one (MaskDiT)."""
    return {"ddpm": randomize(create_model("DiT-T/2", input_size=8, num_classes=NUM_CLASSES)).eval(),
            "edm": randomize(create_model("MaskDiT-T/2", input_size=8, num_classes=NUM_CLASSES)).eval()}


def _model(models: dict, name: str) -> torch.nn.Module:
    return models["edm" if name in EDM_SAMPLERS else "ddpm"]


def _guided(model: torch.nn.Module, **kw) -> ClassifierFreeGuidance:
    return ClassifierFreeGuidance(model, GuidanceConfig(**kw), null_class=NUM_CLASSES, num_timesteps=1000,
                                  latent_channels=SHAPE[0])


def _sample(name: str, denoiser, indices: list[int], steps: int = 4, seed: int = 0,
            diffusion: ScheduleConfig = ScheduleConfig()) -> torch.Tensor:
    """DDPM samplers on `diffusion`; edm-heun on EDM's sigmas, with churn so that it draws noise."""
    gens = noise_generators(seed, indices)
    labels = torch.tensor(class_labels("random", seed, indices, NUM_CLASSES))
    kwargs = dict(diffusion=diffusion, timesteps=sampling_timesteps(diffusion.num_timesteps, steps))
    if name in EDM_SAMPLERS:
        kwargs = dict(diffusion=EDMConfig(), timesteps=karras_sigmas(EDMConfig(), steps), churn=IMAGENET_CHURN)
    return SAMPLERS[name](denoiser, initial_noise(gens, SHAPE), labels, step_noise=per_sample_noise(gens), **kwargs)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("guidance", [
    dict(scale=1.5), dict(scale=3.8, schedule="power-cosine", power=4.0), dict(scale=4.0, channels=3),
])
def test_each_sampler_and_schedule_runs(models, name: str, guidance: dict) -> None:
    if name in EDM_SAMPLERS and guidance.get("schedule") == "power-cosine":
        pytest.skip("power-cosine guidance is defined over DDPM timesteps (mdt sample refuses it for EDM)")
    model = _model(models, name)
    out = _sample(name, _guided(model, **guidance), [0, 1, 2])
    assert out.shape == (3, *SHAPE)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert not torch.equal(out, _sample(name, model, [0, 1, 2]))  # guidance changes the result


@pytest.mark.parametrize("name", DDPM_SAMPLERS)
def test_model_without_learned_sigma(name: str) -> None:
    plain = randomize(create_model("DiT-T/2", input_size=8, num_classes=NUM_CLASSES, learn_sigma=False)).eval()
    out = _sample(name, _guided(plain, scale=2.0), [5, 6], diffusion=ScheduleConfig(learn_sigma=False))
    assert out.shape == (2, *SHAPE)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sample_depends_only_on_its_own_seed(models, name: str) -> None:
    """Same batch shape, other neighbours and position: the same sample up to float rounding (some CPU
    kernels depend on a row's position, which is why `mdt sample` computes fixed batches)."""
    model = _model(models, name)
    first = _sample(name, _guided(model, scale=2.0), [3, 4, 5])
    second = _sample(name, _guided(model, scale=2.0), [4, 9, 0])
    torch.testing.assert_close(first[1], second[0], rtol=1e-5, atol=1e-4)
    assert torch.equal(first, _sample(name, _guided(model, scale=2.0), [3, 4, 5]))  # same batch: same bits
    assert not torch.allclose(first[0], first[1])


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_scale_one_equals_the_unguided_model(models, name: str) -> None:
    model = _model(models, name)
    for schedule in ("constant", "power-cosine"):
        guided = _sample(name, _guided(model, scale=1.0, schedule=schedule), [0, 1])
        assert torch.equal(guided, _sample(name, model, [0, 1]))


SEED_KEYS = [(seed, index, stream) for seed in (0, 1, 2**40) for index in (0, 1, 2, 999_999) for stream in (0, 1)]


def test_seeds_are_distinct_across_seeds_indices_and_streams() -> None:
    seeds = [derived_seed(*key) for key in SEED_KEYS]
    assert len(set(seeds)) == len(seeds)
    neighbours = {derived_seed(0, i, stream) for i in range(500) for stream in (0, 1)}
    assert len(neighbours) == 1000
    assert all(0 <= s < 2**63 for s in neighbours)


@pytest.mark.slow
def test_seeds_are_the_same_in_another_process() -> None:
    """Another interpreter with another hash seed: nothing may come from process state."""
    code = ("import json, sys; from mdt.sample.seeding import derived_seed; "
            "print(json.dumps([derived_seed(*k) for k in json.loads(sys.argv[1])]))")
    result = run_python("-c", code, json.dumps(SEED_KEYS), env={"PYTHONHASHSEED": "12345"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [derived_seed(*key) for key in SEED_KEYS]


# The exact denoiser of data x0 ~ N(0.1 y, 0.5^2) under DDPM's linear betas, written in float64:
# eps*(x_t) = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar). Its own table of abar.
ABAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
DATA_STD = 0.5


def exact_eps(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    abar = torch.from_numpy(ABAR)[t.long()].view(-1, 1, 1, 1)
    mean = 0.1 * y.double().view(-1, 1, 1, 1)
    return (1 - abar).sqrt() * (x.double() - abar.sqrt() * mean) / (abar * DATA_STD**2 + 1 - abar)


def exact_denoiser(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """As a learned-sigma network returns it: eps, then C variance channels (unused by DDIM/DPM++)."""
    eps = exact_eps(x, t, y).to(x.dtype)
    return torch.cat([eps, torch.full_like(eps, 0.3)], dim=1)


def ddim_reference(x: torch.Tensor, y: torch.Tensor, timesteps: list[int]) -> torch.Tensor:
    """DDIM, eta = 0 (Song et al., eq. 12) over the visited steps, from the noisiest."""
    x = x.double()
    for i in reversed(range(len(timesteps))):
        t, abar = timesteps[i], ABAR[timesteps[i]]
        abar_prev = ABAR[timesteps[i - 1]] if i > 0 else 1.0
        eps = exact_eps(x, torch.full((x.shape[0],), t), y)
        x0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
        x = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * eps
    return x


def dpmpp_2m_reference(x: torch.Tensor, y: torch.Tensor, timesteps: list[int]) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): first order on the first step and on the last
    one, into sigma = 0, where the result is the data prediction."""
    ts = sorted(timesteps, reverse=True)
    x = x.double()
    previous = None  # (data prediction, step size h) of the step before

    def lam(t: int) -> float:  # log(alpha / sigma)
        return 0.5 * math.log(ABAR[t] / (1 - ABAR[t]))

    for i, t in enumerate(ts):
        x0 = (x - math.sqrt(1 - ABAR[t]) * exact_eps(x, torch.full((x.shape[0],), t), y)) / math.sqrt(ABAR[t])
        if i == len(ts) - 1:
            return x0
        s = ts[i + 1]
        h = lam(s) - lam(t)
        d = x0 if previous is None else x0 + 0.5 * (h / previous[1]) * (x0 - previous[0])
        x = math.sqrt((1 - ABAR[s]) / (1 - ABAR[t])) * x - math.sqrt(ABAR[s]) * math.expm1(-h) * d
        previous = (x0, h)
    return x


@pytest.mark.parametrize(("sampler", "reference"), [(sample_ddim, ddim_reference), (sample_dpmpp, dpmpp_2m_reference)])
def test_deterministic_samplers_match_their_float64_reference(sampler, reference) -> None:
    timesteps = sampling_timesteps(1000, 7)
    noise = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 4, 9])
    out = sampler(exact_denoiser, noise, labels, diffusion=ScheduleConfig(), timesteps=timesteps,
                  step_noise=lambda like: pytest.fail("a deterministic sampler drew noise"))
    expected = reference(noise, labels, timesteps)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    # the exact denoiser lands near its data: the mean of class y is 0.1 y
    assert out.mean(dim=(1, 2, 3)).tolist() == pytest.approx([0.0, 0.4, 0.9], abs=0.15)


def test_class_modes() -> None:
    assert class_labels("balanced", 0, [0, 1, 10, 11], 10) == [0, 1, 0, 1]
    assert class_labels([207, 980], 0, [0, 1, 2], 1000) == [207, 980, 207]
    random_labels = class_labels("random", 0, list(range(200)), 10)
    assert set(random_labels) == set(range(10))
    assert class_labels("random", 0, [7], 10) == random_labels[7:8]
