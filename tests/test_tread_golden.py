"""Golden tests against the official TREAD code (CompVis/tread fccf77c, fixtures made by
tests/fixtures/make_tread_fixtures.py with every tensor random): a DiT imported with TREAD's two routes
gives the official routed forward (the official kept tokens substituted through their noise) and plain
forward, the official EDM loss with routing (the same draws from the same seed), and the official Heun
trajectory at inference (routing off)."""

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

from mdt.diffusion.edm import EDMConfig, EDMObjective, karras_sigmas
from mdt.models import load_pretrained
from mdt.models.routing import Router
from mdt.sample.guidance import ClassifierFreeGuidance, GuidanceConfig
from mdt.sample.samplers import Churn, sample_edm_heun

NUM_CLASSES = 10
ROUTES = "routes=[{ratio: 0.5, start: 1, end: 2}, {ratio: 0.25, start: 3, end: 4}]"


def assert_matches_official(out: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * max(1.0, expected.abs().max().item()))


@pytest.fixture(scope="module")
def fixture(tmp_path_factory) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict]:
    tensors, meta = load_fixture("tread")
    directory = tmp_path_factory.mktemp("tread")
    source = write_source("raw", official_state_dict(tensors), directory)
    result = mdt_import(source, directory / "export", "DiT", ["num_heads=4", ROUTES])
    assert result.exit_code == 0, result.output
    return load_pretrained(directory / "export"), tensors, meta


def route_scores(e: dict[str, torch.Tensor], prefix: str) -> list[torch.Tensor]:
    return [e[f"{prefix}.noise.{i}"] for i in range(2)]


def test_the_import_keeps_the_routes_and_no_new_parameters(fixture) -> None:
    net, e, meta = fixture
    assert [(r.ratio, r.start, r.end) for r in net.config.routes] == [(0.5, 1, 2), (0.25, 3, 4)]
    assert net.config.learn_sigma is False
    assert len(net.state_dict()) == len(official_state_dict(e))


def test_routed_forward_is_the_official_one(fixture) -> None:
    net, e, _ = fixture
    x, t, y = e["forward.x"], e["forward.t"], e["forward.y"]
    net.train()
    with torch.no_grad():
        routed = net(x, t, y, route_scores=route_scores(e, "forward"))
        plain_in_training = net(x, t, y)  # no scores: no routing (the sampler and validation pass none)
    net.eval()
    assert_matches_official(routed, e["forward.routed"])
    assert_matches_official(plain_in_training, e["forward.plain"])
    assert (routed - e["forward.plain"]).abs().max() > 0.1  # the routes change the output


def test_edm_loss_with_routing_is_the_official_one(fixture) -> None:
    """Our objective draws sigma, noise, label dropout and the routes' scores in the official order: from
    the official seed it computes the official loss."""
    net, e, _ = fixture
    objective = EDMObjective(EDMConfig(), num_classes=NUM_CLASSES, grid_size=4, patch_size=2, class_dropout=0.5,
                             routes=2)
    net.train()
    with torch.no_grad():
        sigma = (e["loss.rnd_normal"].flatten() * 1.2 - 1.2).exp()
        dropped = torch.where(e["loss.drop"] < 0.5, NUM_CLASSES, e["loss.y"])
        terms = objective.terms(net, e["loss.x"], dropped, sigma, e["loss.unit_noise"], None,
                                route_scores(e, "loss"))
        drawn = objective(net, e["loss.x"], e["loss.y"], torch.Generator().manual_seed(3))  # SEED + 3
    net.eval()
    assert_matches_official(terms["denoise"], e["loss.per_sample"])
    assert_matches_official(drawn.loss, e["loss.mean"])


def test_the_block_after_a_rejoin_runs_without_cuda_autocast_a_no_op_on_the_cpu() -> None:
    router = Router((), None)
    router.fp32_next = True
    context = router.block_context(torch.zeros(1))
    assert type(context).__name__ == "nullcontext"  # CPU tensors: the official autocast("cuda") is a no-op
    assert router.fp32_next is False
    if torch.cuda.is_available():
        router.fp32_next = True
        context = router.block_context(torch.zeros(1, device="cuda"))
        assert isinstance(context, torch.autocast) and not context._enabled


def test_heun_trajectory_at_inference_is_the_official_one(fixture, attention_kernel: float) -> None:
    net, e, _ = fixture
    sigmas = karras_sigmas(EDMConfig(), len(e["sampler.t_steps"]) - 1)
    torch.testing.assert_close(torch.tensor(sigmas, dtype=torch.float64), e["sampler.t_steps"], rtol=1e-12, atol=0)
    denoiser = ClassifierFreeGuidance(net, GuidanceConfig(scale=1.0), null_class=NUM_CLASSES, num_timesteps=1,
                                      latent_channels=4)
    out = sample_edm_heun(denoiser, e["sampler.latents"], e["sampler.labels"], diffusion=EDMConfig(),
                          timesteps=sigmas, step_noise=lambda like: torch.zeros_like(like), churn=Churn())
    assert_trajectory_close(out.double(), e["sampler.out"], attention_kernel)


def test_routes_are_refused_for_families_that_cannot_route(tmp_path: Path) -> None:
    from mdt.models import model_config

    for name in ("MDTv2-S/2", "MDT-S/2"):
        with pytest.raises(ValueError, match="routes \\(TREAD\\) apply to DiT and MaskDiT's encoder"):
            model_config(name, routes=[{"ratio": 0.5, "start": 1, "end": 2}])
    with pytest.raises(ValueError, match="0 <= start <= end < 12 \\(the encoder's depth\\)"):
        model_config("DiT-S/2", routes=[{"ratio": 0.5, "start": 2, "end": 12}])
    with pytest.raises(ValueError, match="ratio"):
        model_config("DiT-S/2", routes=[{"ratio": 1.0, "start": 2, "end": 4}])
