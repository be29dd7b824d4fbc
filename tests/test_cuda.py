"""CUDA-only checks (skipped without a GPU): the attention backends agree, bf16 trains."""

from __future__ import annotations

import pytest
import torch

from mdt.models import create_model, random_mask
from mdt.models.attention import attention, xformers_usable

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _leaves(shape_qkv, bias_shape, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(shape_qkv, generator=gen, device="cuda", dtype=dtype).requires_grad_() for _ in range(3))
    bias = (torch.randn(bias_shape, generator=gen, device="cuda", dtype=dtype).requires_grad_()
            if bias_shape else None)
    return q, k, v, bias


@cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not xformers_usable(torch.device("cuda")),
                    reason="needs xformers with CUDA kernels")
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 5e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bias_shape", [None, (16, 256, 256), (4, 16, 256, 256), (4, 16, 100, 100)])
def test_xformers_and_sdpa_agree_forward_and_backward(dtype, tol, bias_shape):
    n = bias_shape[-1] if bias_shape else 256
    results = {}
    for backend in ("sdpa", "xformers"):
        q, k, v, bias = _leaves((4, 16, n, 72), bias_shape, dtype)
        out = attention(q, k, v, bias, backend)
        out.float().square().sum().backward()
        grads = [t.grad.float() for t in (q, k, v, bias) if t is not None]
        results[backend] = (out.float(), grads)
    out_s, grads_s = results["sdpa"]
    out_x, grads_x = results["xformers"]
    scale = out_s.abs().max()
    assert (out_s - out_x).abs().max() <= tol * scale
    for a, b in zip(grads_s, grads_x, strict=True):
        assert (a - b).abs().max() <= tol * a.abs().max() * 4


@cuda
@pytest.mark.parametrize("name", ["MDTv2-S/2", "MaskDiT-S/2"])
def test_bf16_forward_backward_on_gpu_matches_fp32(name):
    torch.manual_seed(0)
    model = create_model(name).cuda()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(4, 4, 32, 32, device="cuda")
    t = torch.randint(0, 1000, (4,), device="cuda")
    y = torch.randint(0, 1000, (4,), device="cuda")
    mask = random_mask(4, 16, 0.5, generator=torch.Generator().manual_seed(0), device="cuda")
    ref = model(x, t, y, mask)
    out = model.to(torch.bfloat16)(x.bfloat16(), t, y, mask).float()
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max() + 1e-3


@cuda
@pytest.mark.parametrize("family, allowed", [("DiT", 0), ("MaskDiT", 1), ("MDTv2", 2)])
def test_a_training_forward_and_backward_waits_on_the_gpu_only_where_a_shape_needs_it(family, allowed):
    """Host syncs stall the GPU queue. Allowed: the kept-token count of a masked pass (it sets a
    shape) and MDT's per-batch mask ratio."""
    import warnings

    from mdt.diffusion import make_objective

    model = create_model(f"{family}-T/2").cuda()
    cfg = model.config
    objective = make_objective(cfg.family, num_classes=cfg.num_classes, grid_size=cfg.grid_size,
                               patch_size=cfg.patch_size, learn_sigma=cfg.learn_sigma)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x0 = torch.randn(4, cfg.in_channels, cfg.input_size, cfg.input_size, device="cuda")
    y = torch.randint(0, cfg.num_classes, (4,), device="cuda")
    objective(model, x0, y, gen).loss.backward()  # first call: tables move to the GPU once
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            objective(model, x0, y, gen).loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= allowed, syncs


@cuda
@pytest.mark.parametrize("bias_shape", [None, (16, 256, 256), (4, 16, 256, 256)])
def test_flex_attention_agrees_with_sdpa_forward_and_backward_in_bf16(bias_shape):
    """FlexAttention (compiled) against SDPA, gradients to the bias included."""
    results = {}
    for backend in ("sdpa", "flex"):
        q, k, v, bias = _leaves((4, 16, 256, 64), bias_shape, torch.bfloat16)
        out = attention(q, k, v, bias, backend)
        out.float().square().sum().backward()
        results[backend] = (out.float(), [t.grad.float() for t in (q, k, v, bias) if t is not None])
    (out_s, grads_s), (out_f, grads_f) = results["sdpa"], results["flex"]
    assert (out_s - out_f).abs().max() <= 2e-2 * out_s.abs().max()
    for a, b in zip(grads_s, grads_f, strict=True):
        assert (a - b).abs().max() <= 8e-2 * a.abs().max()


@cuda
def test_activation_checkpointing_saves_memory_at_the_same_loss():
    torch.manual_seed(0)
    model = create_model("DiT-B/2").cuda()
    x = torch.randn(16, 4, 32, 32, device="cuda")
    t, y = torch.randint(0, 1000, (16,), device="cuda"), torch.randint(0, 1000, (16,), device="cuda")
    peaks, losses = {}, {}
    for enabled in (False, True):
        model.set_activation_checkpointing(enabled)
        model.zero_grad(set_to_none=True)
        torch.cuda.reset_peak_memory_stats()
        loss = model(x, t, y).square().mean()
        loss.backward()
        peaks[enabled], losses[enabled] = torch.cuda.max_memory_allocated(), loss.item()
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    assert peaks[True] < 0.8 * peaks[False], peaks
