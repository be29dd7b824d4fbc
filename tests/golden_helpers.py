"""What the golden tests against the official code bases share: the fixtures in tests/fixtures/official/,
the official checkpoints' layouts written from them, `mdt import` in process, the trajectory tolerance."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mdt.cli import app

FIXTURES = Path(__file__).parent / "fixtures" / "official"


def load_fixture(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(FIXTURES / f"{name}.safetensors"), "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        meta = json.loads(f.metadata()["fixture"])
    return tensors, meta


def official_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("state_dict."):]: v for k, v in tensors.items() if k.startswith("state_dict.")}


def write_source(fmt: str, state_dict: dict[str, torch.Tensor], directory: Path) -> Path:
    """The state_dict saved as the official code saves it."""
    if fmt == "safetensors":
        path = directory / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    elif fmt == "raw":  # DiT-XL-2-256x256.pt, mdt_xl2_v2_ckpt.pt: the EMA state_dict itself
        path = directory / "raw.pt"
        torch.save(state_dict, path)
    else:  # DiT's train.py checkpoint: model, ema, opt, args (an argparse.Namespace)
        path = directory / "train.pt"
        noisy = {k: v + 1.0 if v.is_floating_point() else v for k, v in state_dict.items()}
        torch.save({"model": noisy, "ema": state_dict, "opt": {"state": {}, "param_groups": []},
                    "args": argparse.Namespace(model="DiT-XL/2", global_seed=0)}, path)
    return path


def mdt_import(source: Path, out: Path, model: str, sets: list[str], *extra: str):
    from typer.testing import CliRunner

    args = ["import", str(source), str(out), "--model", model, *[a for s in sets for a in ("--set", s)], *extra]
    return CliRunner().invoke(app, args)


def assert_trajectory_close(out: torch.Tensor, expected: torch.Tensor, relative_to_scale: float) -> None:
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=max(1e-5, relative_to_scale * expected.abs().max()))


# MaskDM (jiachenlei/maskdm): its train_step.py checkpoints.
def weights(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def released_layout(state_dict: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> dict:
    """The dict train_step.py saves: 'model' = GaussianDiffusion.state_dict(), 'ema' = an ema_pytorch EMA
    around it (ema_model.* the average, online_model.* the live copy, initted, step)."""
    diffusion = {**{f"model.{k}": v for k, v in state_dict.items()}, **buffers}
    live = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in diffusion.items()}
    ema = {**{f"ema_model.{k}": v for k, v in diffusion.items()}, **{f"online_model.{k}": v for k, v in live.items()},
           "initted": torch.tensor(True), "step": torch.tensor(20)}
    return {"step": 20, "model": live, "opt": {}, "ema": ema, "scaler": None}
