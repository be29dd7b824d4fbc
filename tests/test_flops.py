"""FLOP counts: `mdt models`, `mdt.models.stats` and the two benchmarks in tools/ give one count,
attention included, and that count is what a real pass computes."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers import ONE_THREAD, REPO_ROOT, run_python
from model_helpers import FAMILIES_TINY
from typer.testing import CliRunner

from mdt.cli import app
from mdt.diffusion import make_objective
from mdt.models import create_model, list_models, model_config, random_mask
from mdt.models.stats import count_flops, model_stats

PASSES = [(name, ratio) for name in FAMILIES_TINY for ratio in ((0.0,) if name.startswith("DiT") else (0.0, 0.5))]


def dit_forward_flops(name: str) -> int:
    """DiT's forward FLOPs per image written out from its config (2 per multiply-add): patch embedding,
    timestep MLP, per block adaLN + qkv + attention + projection + MLP, final adaLN + linear."""
    cfg = model_config(name)
    d, n, p = cfg.hidden_size, cfg.num_tokens, cfg.patch_size
    block = 6 * d * d + n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * 4 * d
    embed = n * p * p * cfg.in_channels * d + 256 * d + d * d
    final = 2 * d * d + n * d * p * p * cfg.out_channels
    return 2 * (embed + cfg.depth * block + final)


@pytest.mark.parametrize("name", ["DiT-T/2", "DiT-S/2", "DiT-XL/2"])
def test_dit_count_is_the_closed_form_attention_included(name: str) -> None:
    assert model_stats(name).forward_flops == dit_forward_flops(name)


def real_pass_flops(name: str, ratio: float) -> tuple[int, int]:
    """Forward and backward FLOPs of a real pass of `name` on the CPU, batch 2, at `ratio` (its own
    random mask), counted by `count_flops` on the operations that run."""
    torch.manual_seed(0)
    model = create_model(name)
    cfg = model.config
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size)
    mask = random_mask(2, cfg.grid_size, ratio, generator=torch.Generator().manual_seed(1)) if ratio else None
    losses = []
    forward = count_flops(lambda: losses.append(model(x, torch.tensor([3, 900]), torch.tensor([0, 1]), mask).sum()))
    backward = count_flops(losses[0].backward)
    return forward, backward


@pytest.mark.parametrize(("name", "ratio"), PASSES)
def test_stats_count_what_a_real_cpu_pass_computes(name: str, ratio: float) -> None:
    """A real pass, batch 2: twice the per-image count that `model_stats` takes from one image (on the
    meta device when unmasked)."""
    stats = model_stats(name, ratio, backward=True)
    assert real_pass_flops(name, ratio) == (2 * stats.forward_flops, 2 * stats.backward_flops)
    if ratio:
        assert stats.forward_flops < model_stats(name).forward_flops


@pytest.mark.parametrize("name", ["DiT-T/2", "MDT-T/2", "MaskDiT-T/2"])  # fixed mask ratios
def test_a_training_step_costs_the_sum_of_its_passes(name: str) -> None:
    """What tools/benchmarks/bench_train.py reports: the objective's forward + backward, pass by pass."""
    sys.path.insert(0, str(REPO_ROOT / "tools" / "benchmarks"))
    from benchmark_utils import pass_flops, step_pass_ratios

    torch.manual_seed(0)
    model = create_model(name)
    cfg = model.config
    objective = make_objective(cfg.family, num_classes=cfg.num_classes, grid_size=cfg.grid_size,
                               patch_size=cfg.patch_size, learn_sigma=cfg.learn_sigma)
    x0 = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size)
    y = torch.tensor([0, 1])
    step = count_flops(lambda: objective(model, x0, y, torch.Generator().manual_seed(0)).loss.backward())
    assert step == 2 * sum(pass_flops(name, ratio) for ratio in step_pass_ratios(objective))


@pytest.mark.slow
def test_mdt_models_prints_the_stats_of_every_preset() -> None:
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:] for line in result.output.splitlines()[1:]}
    assert sorted(rows) == sorted(list_models())
    for name in ("DiT-XL/2", "MDTv2-S/2", "MaskDiT-B/2"):
        stats = model_stats(name)
        assert rows[name] == [f"{stats.params / 1e6:.1f}M", f"{stats.forward_flops / 1e9:.1f}"]
    assert float(rows["DiT-XL/2"][1]) == round(dit_forward_flops("DiT-XL/2") / 1e9, 1)


def run_bench(script: str, *args: str, sizes_flag: str = "--sizes") -> dict[str, list[dict]]:
    result = run_python(f"tools/benchmarks/{script}", sizes_flag, "T", "--batch", "2", "--warmup", "0", "--repeats", "1",
                        *args, env=ONE_THREAD, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    figures: dict[str, list[dict]] = {}
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            figures.setdefault(record["figure"], []).append(record)
    return figures


def fwd_bwd_gflops(name: str, *ratios: float) -> float:
    """Forward + backward GFLOPs per image of passes at `ratios`, as the benchmarks round them."""
    flops = 0
    for ratio in ratios:
        stats = model_stats(name, ratio, backward=True)
        flops += stats.forward_flops + stats.backward_flops
    return round(flops / 1e9, 3)


@pytest.mark.slow
def test_bench_model_reports_what_a_real_pass_computes() -> None:
    """tools/benchmarks/bench_model.py's FLOPs per image are those of a real forward + backward counted here, and
    DiT's forward is its closed form."""
    figures = run_bench("bench_model.py", "--families", "DiT", "MDT", "MDTv2", "MaskDiT")
    passes = {(r["model"], r["mask_ratio"]): r for r in figures["model_pass"]}
    assert sorted(passes) == sorted(PASSES)
    for (name, ratio), record in passes.items():
        forward, backward = real_pass_flops(name, ratio)  # batch 2
        assert record["forward_gflops_per_image"] == round(forward / 2 / 1e9, 3), (name, ratio)
        assert record["gflops_per_image"] == round((forward + backward) / 2 / 1e9, 3), (name, ratio)
        if name.startswith("DiT"):
            assert record["forward_gflops_per_image"] == round(dit_forward_flops(name) / 1e9, 3)


@pytest.mark.slow
def test_bench_train_counts_every_pass_of_the_step_as_mdt_models_does() -> None:
    """The unified flag names (--dtype, --sizes) and the old ones (--precision, --size) both work."""
    figures = run_bench("bench_train.py", "--dtype", "fp32")
    steps = {r["model"]: r["gflops_per_image"] for r in figures["train_step"]}
    assert steps == {"DiT-T/2": fwd_bwd_gflops("DiT-T/2", 0.0),
                     "MDTv2-T/2": fwd_bwd_gflops("MDTv2-T/2", 0.0, 0.4),  # a full pass and one at the mid ratio
                     "MaskDiT-T/2": fwd_bwd_gflops("MaskDiT-T/2", 0.5)}
    (ratio,) = figures["mdtv2_over_dit"]
    assert ratio["flop_ratio"] == pytest.approx(steps["MDTv2-T/2"] / steps["DiT-T/2"], abs=2e-3)
    old_flags = run_bench("bench_train.py", "--precision", "fp32", "--families", "DiT", sizes_flag="--size")
    assert [r["model"] for r in old_flags["train_step"]] == ["DiT-T/2"]
