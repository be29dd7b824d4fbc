"""Golden tests against the official MaskDM code (jiachenlei/maskdm 0e79a60, fixtures made by
tests/fixtures/make_maskdm_fixtures.py with every parameter random): `mdt import` of its checkpoints gives the
official U-ViT's outputs (unconditional and conditional, unmasked and on the official visible set),
the MDSM pre-training and DSM fine-tuning losses, the official DDIM sampler (`--sampler maskdm-ddim`) step
for step, and the sizes of the official MaskDM models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from golden_helpers import FIXTURES, mdt_import, released_layout, weights
from helpers import cli_refusal
from safetensors import safe_open

from mdt.diffusion import diffusion_from_dict
from mdt.diffusion.mdsm import MDSMObjective
from mdt.diffusion.schedule import NoiseSchedule
from mdt.models import load_pretrained, model_config
from mdt.models.registry import build_model

TOL = dict(rtol=1e-5, atol=1e-5)


def _load(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(FIXTURES / name), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["fixture"])


def visible_tokens(image: torch.Tensor, mask: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> the official (B, K, p*p*C) tokens of the visible patches, in grid order."""
    b, c, h, w = image.shape
    tokens = image.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1)
    tokens = tokens.reshape(b, -1, patch * patch * c)
    return tokens[~mask].reshape(b, -1, tokens.shape[-1])


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict:
    tensors, _ = _load("maskdm.safetensors")
    loss, _ = _load("maskdm_loss.safetensors")
    buffers = weights(loss, "diffusion.")
    directory = tmp_path_factory.mktemp("maskdm")
    models = {}
    for name in ("uncond", "cond"):
        torch.save(released_layout(weights(tensors, f"{name}.state_dict."), buffers), directory / f"{name}.pt")
        result = mdt_import(directory / f"{name}.pt", directory / name, "UViT", ["num_heads=2"])
        assert result.exit_code == 0, result.output
        models[name] = load_pretrained(directory / name)
    return {"models": models, "tensors": tensors, "loss": loss, "dir": directory}


def test_imported_config_and_schedule(imported) -> None:
    uncond, cond = imported["models"]["uncond"].config, imported["models"]["cond"].config
    assert (uncond.family, uncond.depth, uncond.hidden_size, uncond.patch_size, uncond.input_size) == ("uvit", 3, 16, 2, 8)
    assert (uncond.in_channels, uncond.num_classes, cond.num_classes, uncond.mlp_ratio) == (3, 0, 5, 2.0)
    diffusion = json.loads((imported["dir"] / "uncond" / "diffusion.json").read_text())
    assert diffusion["beta_schedule"] == "cosine"
    assert diffusion["num_timesteps"] == 1000  # read from the betas
    official_betas = imported["loss"]["diffusion.betas"].double()
    ours = NoiseSchedule(diffusion_from_dict(diffusion)).betas
    torch.testing.assert_close(ours, official_betas, rtol=1e-6, atol=1e-9)


def test_unconditional_uvit_is_the_official_one(imported) -> None:
    net, t = imported["models"]["uncond"], imported["tensors"]
    mask = t["uncond.mask"]
    with torch.no_grad():
        full = net(t["uncond.x"], t["uncond.t"])
        masked = net(t["uncond.x"], t["uncond.t"], None, mask)
    torch.testing.assert_close(full, t["uncond.full"], **TOL)
    torch.testing.assert_close(visible_tokens(masked, mask, 2), t["uncond.masked"], **TOL)
    assert not visible_tokens(masked, ~mask, 2).any()  # dropped patches: zeros


def test_conditional_uvit_is_the_official_one(imported) -> None:
    """Labels as a token before the time token; y=None and the null label are the official uncond_embed."""
    net, t = imported["models"]["cond"], imported["tensors"]
    x, steps, y, mask = t["cond.x"], t["cond.t"], t["cond.y"], t["cond.mask"]
    null = torch.full_like(y, 5)
    with torch.no_grad():
        torch.testing.assert_close(net(x, steps, y), t["cond.full"], **TOL)
        torch.testing.assert_close(visible_tokens(net(x, steps, y, mask), mask, 2), t["cond.masked"], **TOL)
        for labels in (None, null):
            torch.testing.assert_close(net(x, steps, labels), t["cond.null_full"], **TOL)
            torch.testing.assert_close(visible_tokens(net(x, steps, labels, mask), mask, 2), t["cond.null_masked"],
                                       **TOL)


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_mdsm_loss_is_the_official_one(imported, stage: str) -> None:
    net, e = imported["models"]["uncond"], imported["loss"]
    objective = MDSMObjective(NoiseSchedule(diffusion_from_dict({"learn_sigma": False}, family="uvit")),
                              num_classes=0, grid_size=4, patch_size=2, mask_ratio=0.5, masker="block", mask_block=2)
    x0 = e["loss.images"] * 2 - 1  # the official normalisation; mdt's pixel encoding stores [-1, 1]
    mask = e[f"{stage}.mask"] if stage == "pretrain" else None
    with torch.no_grad():
        terms = objective.terms(net, x0, None, e[f"{stage}.t"], e[f"{stage}.noise"], mask)
    torch.testing.assert_close(terms["mse"].mean(), e[f"{stage}.loss"], **TOL)


def _replayed(draws: torch.Tensor):
    """step_noise that hands out the official per-step draws in order (then zeros: ADM's DDIM also draws
    for its last step, where sigma is 0)."""
    queue = list(draws)
    return lambda x: queue.pop(0) if queue else torch.zeros_like(x)


def test_linspace_grid_of_the_official_eval() -> None:
    """eval.py's 250 of 1000 steps: 3, 7, ..., 999 (ADM's even spacing would start at 0); any count gives that
    many distinct steps."""
    from mdt.diffusion.respacing import sampling_timesteps

    assert sampling_timesteps(1000, 250, "linspace") == list(range(3, 1000, 4))
    assert all(len(sampling_timesteps(1000, n, "linspace")) == n for n in (1, 7, 333, 999, 1000))


@pytest.mark.parametrize("run", ["eta1", "eta0"])
def test_maskdm_ddim_is_the_official_sampler(imported, run: str) -> None:
    """maskdm-ddim on the imported model, with the official start and per-step noise, gives the official
    ddim_sample's images (its grid, clipped x0 with the raw eps, eta, last step x0); ADM's DDIM with the
    same eta, which neither clips nor keeps the raw eps, does not."""
    from mdt.diffusion.respacing import sampling_timesteps
    from mdt.sample.samplers import sample_ddim, sample_maskdm_ddim

    net = imported["models"]["uncond"]
    d, meta = _load("maskdm_ddim.safetensors")
    eta, steps = meta["runs"][run]["eta"], meta["runs"][run]["steps"]
    diffusion = diffusion_from_dict(json.loads((imported["dir"] / "uncond" / "diffusion.json").read_text()))
    timesteps = sampling_timesteps(diffusion.num_timesteps, steps, "linspace")
    assert timesteps == sorted(d[f"{run}.times"].tolist())
    labels = torch.zeros(3, dtype=torch.long)
    kwargs = dict(diffusion=diffusion, timesteps=timesteps, eta=eta)
    ours = sample_maskdm_ddim(net, d[f"{run}.noise"], labels, step_noise=_replayed(d[f"{run}.step_noise"]), **kwargs)
    torch.testing.assert_close((ours + 1) / 2, d[f"{run}.images"], **TOL)
    adm = sample_ddim(net, d[f"{run}.noise"], labels, step_noise=_replayed(d[f"{run}.step_noise"]), **kwargs)
    assert ((adm + 1) / 2 - d[f"{run}.images"]).abs().max() > 0.1


def test_presets_have_the_official_sizes() -> None:
    counts = json.loads((FIXTURES / "maskdm_param_counts.json").read_text())
    for preset, label in (("UViT-B/4", "MaskDM-B (celebahq_base_90p.yml)"), ("UViT-S/4", "small (celebahq_small_90p.yml)")):
        cfg = model_config(preset)
        assert (cfg.input_size, cfg.in_channels, cfg.num_classes) == (256, 3, 0)
        with torch.device("meta"):
            model = build_model(cfg)
        assert sum(p.numel() for p in model.parameters()) == counts[label]


def test_a_released_checkpoint_that_does_not_fit_is_refused_in_one_sentence(tmp_path: Path) -> None:
    tensors, _ = _load("maskdm.safetensors")
    state_dict = weights(tensors, "uncond.state_dict.")
    cases = {"out_blocks": {k: v for k, v in state_dict.items() if not k.startswith("encoder.out_blocks.")},
             "q_bias": {**state_dict, "encoder.in_blocks.0.attn.q_bias": torch.zeros(16)},
             "betas": None}
    for name, sd in cases.items():
        buffers = {"betas": torch.full((1000,), 0.01)} if name == "betas" else {}
        torch.save(released_layout(sd or state_dict, buffers), tmp_path / f"{name}.pt")
        result = mdt_import(tmp_path / f"{name}.pt", tmp_path / name, "UViT", ["num_heads=2"])
        message = cli_refusal(result)
        assert "MaskDM" in message
        assert "\n" not in message
        assert name.split("_")[0] in message
        assert not (tmp_path / name).exists()


def test_mdt_sample_takes_an_imported_conditional_uvit(imported, tmp_path: Path) -> None:
    """DDIM on the cosine schedule the import recorded, unguided and guided (labels and the null label
    through the sampler's guidance wrapper)."""
    from typer.testing import CliRunner

    from mdt.cli import app

    base = ["sample", "--ckpt", str(imported["dir"] / "cond"), "--vae", "pixel", "--num-samples", "2", "--steps", "3",
            "--batch-size", "2", "--sampler", "ddim", "--classes", "1,4"]
    for scale in ("1", "1.5"):
        result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / scale), "--cfg-scale", scale])
        assert result.exit_code == 0, result.output
        record = json.loads((tmp_path / scale / "sample_config.json").read_text())
        assert record["sampler"] == "ddim"
        assert len(list((tmp_path / scale).glob("0*.png"))) == 2
