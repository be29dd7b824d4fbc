"""Training options that trade compute for speed or memory: activation checkpointing and
torch.compile (the FlexAttention backend is in test_attention.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli
from PIL import Image

from mdt.models import create_model
from mdt.models.masking import random_mask

ROUTE = {"ratio": 0.5, "start": 1, "end": 2}  # TREAD: half the tokens skip blocks 1-2 of T/2's 4


def _model(name: str) -> torch.nn.Module:
    """A preset at 8 px; `+routes`: with a TREAD route."""
    torch.manual_seed(0)
    base = name.removesuffix("+routes")
    model = create_model(base, input_size=8, num_classes=4, routes=[ROUTE] if base != name else [])
    for module in model.modules():  # adaLN and the output start at zero: give every block an effect
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.05)
    return model


@pytest.mark.parametrize("name", ["DiT-T/2", "MDTv2-T/2", "MaskDiT-T/2", "DiT-T/2+routes", "MaskDiT-T/2+routes"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(name: str) -> None:
    model = _model(name)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 400, 999]), torch.tensor([0, 2, 4])
    mask = random_mask(3, 4, 0.5, generator=torch.Generator().manual_seed(1)) if "MDT" in name or "Mask" in name else None
    scores = [torch.rand(3, 16, generator=torch.Generator().manual_seed(2))] if name.endswith("+routes") else None

    def loss_and_grads(checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        model.set_activation_checkpointing(checkpointing)
        loss = model(x, t, y, mask, route_scores=scores).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain = loss_and_grads(False)
    saved_loss, saved = loss_and_grads(True)
    assert torch.equal(plain_loss, saved_loss)
    assert plain.keys() == saved.keys()
    for name_, grad in plain.items():
        torch.testing.assert_close(saved[name_], grad, rtol=1e-6, atol=1e-7, msg=name_)
    assert any(grad.abs().sum() > 0 for grad in plain.values())


def test_activation_checkpointing_recomputes_in_the_backward_pass() -> None:
    """With it on, each block's forward runs again during backward (what saves the memory)."""
    model = _model("DiT-T/2")
    calls = []
    block = model.encoder.blocks[0]
    block.mlp.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1])
    for enabled, expected in ((False, 1), (True, 2)):
        calls.clear()
        model.set_activation_checkpointing(enabled)
        model(x, t, y).sum().backward()
        assert len(calls) == expected


@pytest.mark.slow
def test_a_routed_pass_compiles_to_the_eager_result() -> None:
    model = _model("DiT-T/2+routes")
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 400, 999]), torch.tensor([0, 2, 4])
    scores = [torch.rand(3, 16, generator=torch.Generator().manual_seed(2))]
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(x, t, y, route_scores=scores), model(x, t, y, route_scores=scores))
    torch.testing.assert_close(compiled(x, t, y), model(x, t, y))  # and without routes (inference)


def test_masked_passes_with_changing_kept_counts_do_not_recompile_every_batch() -> None:
    """MDT draws a mask ratio per batch: after one recompile the token dimension is dynamic."""
    import torch._dynamo

    torch._dynamo.reset()
    model = _model("MDTv2-T/2")
    model.compile(dynamic=None, backend="aot_eager")  # dynamo's guards are the same for every backend
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1])
    compiles = []
    for ratio in (0.3, 0.4, 0.5, 0.45, 0.35):
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        model(x, t, y, random_mask(2, 4, ratio, generator=torch.Generator().manual_seed(0))).sum().backward()
        compiles.append(torch._dynamo.utils.counters["stats"]["unique_graphs"] - before)
    assert compiles[0] > 0, compiles
    assert sum(compiles[2:]) == 0, compiles
    torch._dynamo.reset()


@pytest.mark.slow
def test_train_compiled_under_deepspeed_matches_eager(tmp_path: Path) -> None:
    from mdt.data.encode import EncodeConfig, encode_dataset

    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "images" / f"c{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)).save(tmp_path / "images" / f"c{c}" / f"{i}.png")
    encode_dataset(EncodeConfig(str(tmp_path / "images"), str(tmp_path / "latents"), resolution=8, vae="pixel",
                                shard_size=4, workers=0, progress=False))
    losses = {}
    for flag in ("--compile", "--no-compile"):
        run = tmp_path / flag
        result = run_cli("train", "--data", str(tmp_path / "latents"), "--model", "DiT-T/2", "--out", str(run),
                         "--steps", "3", "--micro-batch", "4", "--log-every", "1", "--num-workers", "0",
                         "--set", "model_options.input_size=8", flag, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("compiled" if flag == "--compile" else "eager") in result.stdout
        losses[flag] = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses["--compile"]) == 3
    np.testing.assert_allclose(losses["--compile"], losses["--no-compile"], rtol=1e-5)
