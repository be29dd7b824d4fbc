"""The optimizer factory, and Adan golden against the official sail-sg/Adan (2c65bea, fixture made by
tests/fixtures/make_adan_fixtures.py): clipping the global gradient norm to 1 (what DeepSpeed's gradient_clipping
does) and then stepping timm's Adan follows the official Adan(max_grad_norm=1) trajectory step for step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mdt.errors import UserError
from mdt.train.optimizer import OPTIMIZERS, OptimizerConfig, build_optimizer

FIXTURE = Path(__file__).parent / "fixtures" / "official" / "adan.safetensors"
RTOL, ATOL = 1e-6, 1e-7  # measured: at most 6e-8 apart (1 float32 ulp at |w| ~ 0.5), 360 of 402 bit-equal


@pytest.fixture(scope="module")
def golden() -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(FIXTURE), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["fixture"])


def tiny_model(tensors: dict[str, torch.Tensor]) -> torch.nn.Sequential:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model.load_state_dict({k[len("initial."):]: v for k, v in tensors.items() if k.startswith("initial.")})
    return model


def replay(tensors: dict[str, torch.Tensor], meta: dict, weight_decay: float, *, clip: bool = True,
           flat: bool = False) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """mdt's path: clip_grad_norm_(1) then build_optimizer('adan').step(); `flat` steps one flat fp32 tensor
    holding every parameter, as DeepSpeed ZeRO hands the optimizer its partition."""
    model = tiny_model(tensors)
    params = list(model.parameters())
    stepped = [torch.nn.Parameter(torch.cat([p.detach().flatten() for p in params]))] if flat else params
    cfg = OptimizerConfig(name="adan", betas=tuple(meta["betas"]), eps=meta["eps"], weight_decay=weight_decay)
    opt = build_optimizer(stepped, cfg, lr=meta["lr"])
    weights, norms = [], []
    for k in range(meta["steps"]):
        model.zero_grad()
        x, y, scale = tensors["inputs.x"][k], tensors["inputs.y"][k], tensors["inputs.scale"][k]
        (scale * ((model(x) - y) ** 2).mean()).backward()
        norm = torch.nn.utils.clip_grad_norm_(params, meta["max_grad_norm"] if clip else float("inf"))
        norms.append(float(norm))
        if flat:
            stepped[0].grad = torch.cat([p.grad.flatten() for p in params])
        opt.step()
        if flat:
            torch.nn.utils.vector_to_parameters(stepped[0].detach(), params)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return weights, norms


def official_step(tensors: dict[str, torch.Tensor], run: int, k: int) -> dict[str, torch.Tensor]:
    prefix = f"wd{run}.step{k}."
    return {key[len(prefix):]: v for key, v in tensors.items() if key.startswith(prefix)}


def max_relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float(((a[n] - b[n]).abs() / b[n].abs().clamp_min(1e-3)).max()) for n in b)


@pytest.mark.parametrize("flat", [False, True], ids=["per-tensor", "flat-partition"])
@pytest.mark.parametrize("run", [0, 1], ids=["wd0", "wd0.02"])
def test_clip_then_timm_adan_matches_official(golden, run: int, flat: bool) -> None:
    tensors, meta = golden
    weights, norms = replay(tensors, meta, meta["weight_decays"][run], flat=flat)
    torch.testing.assert_close(torch.tensor(norms), tensors[f"wd{run}.grad_norm"], rtol=RTOL, atol=0)
    for k, mine in enumerate(weights, start=1):
        torch.testing.assert_close(mine, official_step(tensors, run, k), rtol=RTOL, atol=ATOL, msg=f"step {k}")


def test_fixture_clips_some_steps_and_not_others(golden) -> None:
    tensors, meta = golden
    for run in range(len(meta["weight_decays"])):
        above = tensors[f"wd{run}.grad_norm"] > meta["max_grad_norm"]
        assert 0 < int(above.sum()) < meta["steps"]


def test_without_clipping_the_trajectory_departs(golden) -> None:
    tensors, meta = golden
    weights, _ = replay(tensors, meta, meta["weight_decays"][0], clip=False)
    # Adan's first step is (almost) invariant to the gradient's scale; the departure comes from the
    # later steps, where clipped and unclipped gradients mix in the moments.
    assert max_relative_error(weights[0], official_step(tensors, 0, 1)) < 1e-4
    assert max_relative_error(weights[-1], official_step(tensors, 0, meta["steps"])) > 1e-2


def test_adamw_is_fused_torch_adamw() -> None:
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = build_optimizer(params, OptimizerConfig(betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1), lr=0.5)
    assert type(opt) is torch.optim.AdamW
    group = opt.param_groups[0]
    assert group["fused"] is True
    assert (group["betas"], group["eps"], group["weight_decay"], group["lr"]) == ((0.8, 0.95), 1e-6, 0.1, 0.5)


def test_adan_is_timm_adan_with_official_defaults() -> None:
    from timm.optim import Adan

    opt = build_optimizer([torch.nn.Parameter(torch.zeros(3))], OptimizerConfig("adan", (0.98, 0.92, 0.99)), 1e-4)
    assert type(opt) is Adan
    group = opt.param_groups[0]
    assert (group["betas"], group["eps"], group["no_prox"], group["caution"]) == ((0.98, 0.92, 0.99), 1e-8, False,
                                                                                   False)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "sgd"}, "optimizer.name is 'sgd'; use one of adamw, adan"),
    ({"name": "adan"}, "optimizer.betas has 2 values but adan takes 3; give 3 betas, such as [0.98, 0.92, 0.99]"),
    ({"betas": (0.9, 0.99, 0.999)}, "optimizer.betas has 3 values but adamw takes 2"),
    ({"betas": (0.9, 1.0)}, "optimizer.betas contains 1.0; every beta must be in [0, 1)"),
    ({"name": "adan", "betas": (0.98, -0.1, 0.99)}, "optimizer.betas contains -0.1"),
    ({"eps": 0.0}, "optimizer.eps is 0.0; it must be greater than 0"),
    ({"weight_decay": -0.01}, "optimizer.weight_decay is -0.01; it must be 0 or greater"),
])
def test_config_validation_names_the_setting(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError) as err:
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], OptimizerConfig(**kwargs), lr=1e-3)
    assert message in str(err.value)
    assert str(err.value).count(". ") == 0  # one sentence


def test_every_listed_optimizer_builds() -> None:
    for name in OPTIMIZERS:
        betas = (0.98, 0.92, 0.99) if name == "adan" else (0.9, 0.999)
        opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], OptimizerConfig(name, betas), lr=1e-3)
        assert isinstance(opt, torch.optim.Optimizer)
