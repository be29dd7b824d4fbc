"""Samplers on a tiny random-weight model: shapes, per-sample independence, guidance off = unguided.
(The DDPM and DDIM trajectories against the official code are in test_official_golden.py.)"""

from __future__ import annotations

import pytest
import torch
from model_helpers import randomize
from sample_helpers import NUM_CLASSES

from mdt.diffusion.edm import EDMConfig, karras_sigmas
from mdt.diffusion.respacing import sampling_timesteps
from mdt.diffusion.schedule import ScheduleConfig
from mdt.models import create_model
from mdt.sample.guidance import ClassifierFreeGuidance, GuidanceConfig
from mdt.sample.samplers import EDM_SAMPLERS, IMAGENET_CHURN, SAMPLERS
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
    assert out.shape == (3, *SHAPE) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert not torch.equal(out, _sample(name, model, [0, 1, 2]))  # guidance changes the result


@pytest.mark.parametrize("name", DDPM_SAMPLERS)
def test_model_without_learned_sigma(name: str) -> None:
    plain = randomize(create_model("DiT-T/2", input_size=8, num_classes=NUM_CLASSES, learn_sigma=False)).eval()
    out = _sample(name, _guided(plain, scale=2.0), [5, 6], diffusion=ScheduleConfig(learn_sigma=False))
    assert out.shape == (2, *SHAPE) and torch.isfinite(out).all()


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


def test_seeds_are_stable_and_distinct() -> None:
    seeds = {derived_seed(s, i, stream) for s in (0, 1) for i in range(50) for stream in (0, 1)}
    assert len(seeds) == 200
    assert derived_seed(0, 0, 0) == derived_seed(0, 0, 0)


def test_class_modes() -> None:
    assert class_labels("balanced", 0, [0, 1, 10, 11], 10) == [0, 1, 0, 1]
    assert class_labels([207, 980], 0, [0, 1, 2], 1000) == [207, 980, 207]
    random_labels = class_labels("random", 0, list(range(200)), 10)
    assert set(random_labels) == set(range(10))
    assert class_labels("random", 0, [7], 10) == random_labels[7:8]
