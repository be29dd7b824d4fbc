"""TREAD through the CLI: its recipe trains a tiny routed DiT (model, size and route overridden on the
command line) and `mdt sample` samples it; a route that does not fit the model is one sentence; a routed
training pass costs the FLOPs its route saves."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from helpers import ONE_THREAD, assert_ok, run_cli

from mdt.models.routing import paper_route
from mdt.models.stats import model_stats

RECIPE = "pipelines/tread-dit-b2-in256.yaml"
TINY = ("--model", "DiT-T/2", "--micro-batch", "4", "--set", "global_batch=8", "--set", "model_options.input_size=8",
        "--num-workers", "0", "--log-every", "1", "--set", "val_shards=1", "--set", "val_every=0")


@pytest.mark.slow
def test_the_tread_recipe_trains_a_routed_dit_and_samples_it(pixel_latents: Path, tmp_path: Path) -> None:
    run, samples = tmp_path / "run", tmp_path / "samples"
    trained = run_cli("train", "--config", RECIPE, "--data", str(pixel_latents), "--out", str(run), "--steps", "4",
                      *TINY, "--set", "model_options.routes=[{ratio: 0.5, start: 1, end: 2}]", env=ONE_THREAD,
                      timeout=300)
    assert_ok(trained)
    assert "TREAD routes 1-2 at 0.5" in trained.stdout
    config = json.loads((run / "ema" / "model_config.json").read_text())
    assert (config["routes"], config["learn_sigma"]) == ([{"ratio": 0.5, "start": 1, "end": 2}], False)
    assert json.loads((run / "ema" / "diffusion.json").read_text())["formulation"] == "edm"
    sampled = run_cli("sample", "--config", RECIPE, "--ckpt", str(run), "--out", str(samples), "--num-samples", "4",
                      "--steps", "3", "--batch-size", "4", env=ONE_THREAD, timeout=300)
    assert_ok(sampled)
    assert len(list(samples.glob("*.png"))) >= 4


@pytest.mark.slow
def test_the_recipes_route_on_a_shallower_model_is_one_sentence(pixel_latents: Path, tmp_path: Path) -> None:
    result = run_cli("train", "--config", RECIPE, "--data", str(pixel_latents), "--out", str(tmp_path / "run"),
                     "--steps", "2", *TINY, env=ONE_THREAD, timeout=300)
    assert result.returncode == 2
    assert "route {start: 2, end: 8} does not fit" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("name", "start", "end"), [("DiT-S/2", 2, 8), ("DiT-B/2", 2, 8), ("DiT-XL/2", 2, 24)])
def test_a_routed_pass_saves_the_flops_of_half_the_tokens_in_its_blocks(name: str, start: int, end: int) -> None:
    """Counted by PyTorch's FLOP counter: the routed training pass against the closed form, blocks
    start..end at half the tokens (their attention at a quarter), the rest unchanged."""
    route = dataclasses.asdict(paper_route({"DiT-S/2": 12, "DiT-B/2": 12, "DiT-XL/2": 28}[name]))
    assert (route["start"], route["end"]) == (start, end)
    full = model_stats(name, backward=True, learn_sigma=False, routes=[route])
    routed = model_stats(name, backward=True, routed=True, learn_sigma=False, routes=[route])
    plain = model_stats(name, backward=True, learn_sigma=False)
    assert full.forward_flops == plain.forward_flops  # routes cost nothing without scores (inference)
    total, cut = full.forward_flops + full.backward_flops, routed.forward_flops + routed.backward_flops
    per_block = model_stats(name, backward=True, learn_sigma=False, depth=2)
    per_block = (total - (per_block.forward_flops + per_block.backward_flops)) / (
        {"DiT-S/2": 12, "DiT-B/2": 12, "DiT-XL/2": 28}[name] - 2)
    routed_blocks = end - start + 1
    # A block at half the tokens: linear layers at one half, attention's two products at one quarter.
    assert cut < total - routed_blocks * per_block * 0.5 + 0.02 * total
    assert cut > total - routed_blocks * per_block * 0.75
