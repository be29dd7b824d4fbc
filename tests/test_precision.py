"""Precision modes: what each one asks of DeepSpeed and torch, and tiny runs in each against fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_ok, metrics, run_cli, train_args, train_losses

from mdt.errors import UserError
from mdt.precision import PRECISIONS, autocast, resolve_auto, sampling_mode, set_tf32
from mdt.train.engine import resolve_deepspeed_config

ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def ds_config(precision: str, grad_clip: float = 0.0) -> dict:
    return resolve_deepspeed_config("deepspeed_configs/zero2.json", micro_batch=4, grad_accum=1, world_size=1,
                                    grad_clip=grad_clip, precision=precision)


def test_each_mode_asks_deepspeed_for_its_weights_and_autocast():
    for mode in ("fp32", "tf32"):
        config = ds_config(mode)
        assert config["bf16"]["enabled"] is False
        assert "torch_autocast" not in config
    assert ds_config("bf16")["bf16"]["enabled"] is True
    assert "torch_autocast" not in ds_config("bf16")
    for mode, dtype in (("amp-bf16", "bfloat16"), ("amp-fp16", "float16")):
        config = ds_config(mode)
        assert config["bf16"]["enabled"] is False  # fp32 weights and optimizer
        # No lower-precision-safe module: gradients are reduced in fp32, as DDP reduces them under torch.amp.
        assert config["torch_autocast"] == {"enabled": True, "dtype": dtype, "lower_precision_safe_modules": []}
    assert resolve_auto("auto") == ("bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported()
                                    else "fp32")


def test_amp_fp16_refuses_clipping_deepspeed_would_apply_to_scaled_gradients():
    with pytest.raises(UserError, match="amp-fp16 with grad_clip=1: DeepSpeed would clip the loss-scaled"):
        ds_config("amp-fp16", grad_clip=1.0)
    assert ds_config("amp-bf16", grad_clip=1.0)["gradient_clipping"] == 1.0


def test_sampling_reads_one_list_of_names():
    assert sampling_mode("bf16") == "amp-bf16"  # sampling keeps fp32 weights
    assert sampling_mode("fp16") == "amp-fp16"  # the name sample configs recorded before the modes
    assert sampling_mode("tf32") == "tf32"
    with pytest.raises(UserError, match="'fp8' is not a precision mode; choose one of auto, fp32, tf32"):
        sampling_mode("fp8")
    assert set(PRECISIONS) == {"auto", "fp32", "tf32", "amp-bf16", "amp-fp16", "bf16"}


def test_tf32_switches_both_cuda_flags_and_the_others_switch_them_off():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        set_tf32("tf32")
        assert torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32
        set_tf32("fp32")
        assert not torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_autocast_runs_the_amp_modes_in_their_dtype():
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    for mode, dtype in (("fp32", torch.float32), ("amp-bf16", torch.bfloat16), ("amp-fp16", torch.float16)):
        with autocast(mode, torch.device("cpu")):
            assert layer(x).dtype == dtype
    assert layer.weight.dtype == torch.float32


@pytest.mark.slow
def test_tiny_runs_in_every_training_mode_stay_close_to_fp32(pixel_latents, tmp_path):
    """The same seeded 3-step run per mode: finite and within 5% of fp32's losses; the amp modes differ
    from fp32 (autocast ran), keep fp32 weights in the module DeepSpeed checkpoints, and amp-fp16 logs
    the GradScaler's scale (amp-bf16 needs none)."""
    losses, records = {}, {}
    for mode in ("fp32", "tf32", "amp-bf16", "amp-fp16"):
        run = tmp_path / mode
        assert_ok(run_cli(*train_args(pixel_latents, run, "MDTv2-T/2", 3, "--precision", mode), env=ENV,
                          timeout=200))
        losses[mode] = np.array(list(train_losses(run).values()))
        records[mode] = [r for r in metrics(run) if "loss" in r]
        states = next((run / "checkpoints").glob("step_*/mp_rank_00_model_states.pt"))
        module = torch.load(states, map_location="cpu", weights_only=True)["module"]
        assert {t.dtype for t in module.values()} == {torch.float32}, mode
    for mode in ("amp-bf16", "amp-fp16"):
        assert np.all(np.isfinite(losses[mode]))
        assert np.any(losses[mode][1:] != losses["fp32"][1:]), mode
        np.testing.assert_allclose(losses[mode], losses["fp32"], rtol=0.05)
    # TF32 exists on CUDA only: on a CPU the tf32 mode computes fp32 bit for bit (bf16: test_train.py).
    np.testing.assert_array_equal(losses["tf32"], losses["fp32"])
    assert all(r["loss_scale"] > 1 for r in records["amp-fp16"])
    assert all("loss_scale" not in r for r in records["amp-bf16"] + records["fp32"])
