"""Golden tests against the official DiT, MDT (v1) and MDTv2 code.

The fixtures in tests/fixtures/official/ were made by the official repositories' own code with
seeded random values in every tensor (tests/fixtures/make_official_fixtures.py names the commits). Each
official state_dict goes through `mdt import` in the formats the official code saves, and the
imported model must give the official outputs; the losses and the DDPM/DDIM samplers must give
the official values on the same inputs and noise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from golden_helpers import (
    assert_trajectory_close,
    load_fixture,
    mdt_import,
    official_state_dict,
    write_source,
)

from mdt.diffusion.objectives import DenoisingLoss
from mdt.diffusion.respacing import sampling_timesteps, space_timesteps
from mdt.diffusion.schedule import NoiseSchedule, ScheduleConfig
from mdt.models import load_pretrained
from mdt.sample.guidance import ClassifierFreeGuidance, GuidanceConfig
from mdt.sample.samplers import sample_ddim, sample_ddpm

TOL = dict(rtol=1e-5, atol=1e-5)


def assert_matches_official(out: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to 1e-5 of the output's scale. fp32 kernels round differently on other CPUs: the
    fixtures were made on an AMD EPYC (AVX2); on an Intel Xeon (AVX-512) MDTv1's outputs (|x| up to
    3.2) differ by up to 1.6e-5, 5e-6 of their scale. A wrong layer differs by O(1)."""
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * max(1.0, expected.abs().max().item()))
# fixture -> (--model for mdt import, extra --set options: what no tensor holds)
IMPORTS = {"dit": ("DiT", ["num_heads=4"]), "mdtv1": ("MDT", ["decoder_depth=2"]), "mdtv2": ("MDTv2", [])}


def _import(name: str, directory: Path) -> tuple[str, torch.nn.Module, dict[str, torch.Tensor], dict]:
    tensors, meta = load_fixture(name)
    model, sets = IMPORTS[name]
    result = mdt_import(write_source("raw", official_state_dict(tensors), directory), directory / "export", model, sets)
    assert result.exit_code == 0, result.output
    return name, load_pretrained(directory / "export"), tensors, meta


@pytest.fixture(scope="module", params=["mdtv1", "mdtv2"])
def imported_mdt(request, tmp_path_factory):
    return _import(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def imported_dit(tmp_path_factory):
    return _import("dit", tmp_path_factory.mktemp("dit"))


@pytest.mark.parametrize("fmt", ["raw", "train", "safetensors"])
@pytest.mark.parametrize("name", sorted(IMPORTS))
def test_import_gives_the_official_output(tmp_path: Path, name: str, fmt: str) -> None:
    tensors, _ = load_fixture(name)
    model, sets = IMPORTS[name]
    result = mdt_import(write_source(fmt, official_state_dict(tensors), tmp_path), tmp_path / "out", model, sets)
    assert result.exit_code == 0, result.output
    net = load_pretrained(tmp_path / "out")
    x, t, y = tensors["input.x"], tensors["input.t"], tensors["input.y"]
    with torch.no_grad():
        out = net(x, t, y)
    expected = tensors["output"] if name == "dit" else tensors["output.full"]
    assert_matches_official(out, expected)


def test_masked_pass_gives_the_official_output(imported_mdt) -> None:
    _, net, tensors, _ = imported_mdt
    with torch.no_grad():
        out = net(tensors["input.x"], tensors["input.t"], tensors["input.y"], tensors["input.mask"].bool())
    assert_matches_official(out, tensors["output.masked"])
    kept = (~tensors["input.mask"].bool()).sum(1)
    assert torch.equal(kept, torch.full_like(kept, tensors["input.ids_keep"].shape[1]))


def test_losses_are_the_official_ones(imported_mdt) -> None:
    """Per-sample MSE (Min-SNR-5 weighted for MDTv2, plain for MDTv1) and VLB terms of both passes."""
    name, net, tensors, _ = imported_mdt
    schedule = NoiseSchedule(ScheduleConfig())
    loss = DenoisingLoss(schedule, learn_sigma=True, min_snr_gamma=5.0 if name == "mdtv2" else None)
    x0, t, y, noise = tensors["loss.x0"], tensors["loss.t"], tensors["loss.y"], tensors["loss.noise"]
    xt = schedule.q_sample(x0, t, noise)
    for pass_name, mask in (("full", None), ("masked", tensors["loss.masked.mask"].bool())):
        with torch.no_grad():
            terms = loss(net(xt, t, y, mask), x0, xt, t, noise)
        torch.testing.assert_close(terms["mse"], tensors[f"loss.{pass_name}.mse"], **TOL)
        torch.testing.assert_close(terms["vb"], tensors[f"loss.{pass_name}.vb"], **TOL)


def test_respacing_is_adms_space_timesteps() -> None:
    tensors, _ = load_fixture("dit")
    for kind, spec in (("", "{}"), ("ddim_", "ddim{}")):
        counts, steps = tensors[f"respacing.{kind}counts"].tolist(), tensors[f"respacing.{kind}steps"].tolist()
        offset = 0
        for count in counts:
            assert space_timesteps(1000, spec.format(count)) == steps[offset: offset + count], (kind, count)
            offset += count
        assert offset == len(steps)
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim1")  # no integer stride gives exactly 1 of 1000 steps, as in ADM


def _guided_dit(run: dict, net: torch.nn.Module) -> ClassifierFreeGuidance:
    """Guidance as the fixture's run of DiT's forward_with_cfg: constant scale on the first 3 channels."""
    config = GuidanceConfig(scale=float(run["cfg_scale"]), channels=int(run["guided_channels"]))
    return ClassifierFreeGuidance(net, config, null_class=net.config.num_classes, num_timesteps=1000,
                                  latent_channels=net.config.in_channels)


def test_ddpm_trajectory_is_the_official_one(imported_dit, attention_kernel: float) -> None:
    _, net, tensors, meta = imported_dit
    timesteps = sampling_timesteps(1000, len(tensors["ddpm.timesteps"]))
    assert timesteps == tensors["ddpm.timesteps"].tolist()
    recorded = iter(tensors["ddpm.step_noise"])
    out = sample_ddpm(_guided_dit(meta["ddpm"], net), tensors["ddpm.z"], tensors["ddpm.y"], diffusion=ScheduleConfig(),
                      timesteps=timesteps, step_noise=lambda like: next(recorded))
    assert next(recorded, None) is None  # one draw per step, as the official loop
    assert_trajectory_close(out, tensors["ddpm.out"], attention_kernel)


@pytest.mark.parametrize("spacing", ["even", "ddim"])
def test_ddim_trajectory_is_the_official_one(imported_dit, attention_kernel: float, spacing: str) -> None:
    _, net, tensors, meta = imported_dit
    key = "ddim" if spacing == "even" else "ddim_stride"
    timesteps = sampling_timesteps(1000, len(tensors[f"{key}.timesteps"]), spacing)
    assert timesteps == tensors[f"{key}.timesteps"].tolist()
    out = sample_ddim(_guided_dit(meta[key], net), tensors["ddim.z"], tensors["ddim.y"], diffusion=ScheduleConfig(),
                      timesteps=timesteps, step_noise=lambda like: torch.zeros_like(like))
    assert_trajectory_close(out, tensors[f"{key}.out"], attention_kernel)


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_x0_clipping_is_adms_clip_denoised(sampler: str, clip: bool) -> None:
    """ADM's samplers with clip_denoised (pixel models) and without (DiT's latents), from DiT's own
    gaussian_diffusion.py (tests/fixtures/make_adm_clip_fixtures.py), on a per-pixel linear "model"."""
    tensors, _ = load_fixture("adm_clip")
    weight, bias = tensors["model.weight"], tensors["model.bias"]

    def denoiser(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # the fixture's model_output
        linear = torch.einsum("oc,bchw->bohw", weight, x) * (1.0 + t.float().view(-1, 1, 1, 1) / 1000.0)
        linear = linear + bias.view(1, -1, 1, 1)
        return torch.cat([x + linear[:, :3], torch.tanh(linear[:, 3:])], dim=1)

    recorded = iter(tensors[f"ddpm.clip_{clip}.step_noise"])
    step_noise = (lambda like: next(recorded)) if sampler == "ddpm" else torch.zeros_like
    run = sample_ddpm if sampler == "ddpm" else sample_ddim
    timesteps = tensors[f"{sampler}.timesteps"].tolist()
    out = run(denoiser, tensors["z"], torch.zeros(2, dtype=torch.long), diffusion=ScheduleConfig(),
              timesteps=timesteps, step_noise=step_noise, clip_x0=clip)
    expected = tensors[f"{sampler}.clip_{clip}.out"]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
