"""The U-ViT family (MaskDM's backbone): the forward contract shared with the other families, visible
tokens only under a mask, activation checkpointing, and the registry presets."""

from __future__ import annotations

import pytest
import torch

from mdt.models import block_mask, create_model, list_models, model_config
from mdt.models.stats import model_stats


def tiny(num_classes: int = 0):
    torch.manual_seed(0)
    return create_model("UViT-T/2", input_size=8, num_classes=num_classes)


def test_presets_and_defaults() -> None:
    assert {"UViT-T/2", "UViT-S/4", "UViT-B/4"} <= set(list_models())
    cfg = model_config("UViT-B/4")
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size, cfg.learn_sigma) == (13, 768, 12, 4, False)
    assert model_config("DiT-S/2").input_size == 32  # the latent families keep their defaults
    with pytest.raises(ValueError, match="odd depth"):
        model_config("UViT-T/2", depth=4)
    with pytest.raises(ValueError, match="unknown model"):
        model_config("UViT-XL/4")


def test_labels_are_optional_and_the_null_label_is_unconditional() -> None:
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([0, 10, 999])
    cond = tiny(num_classes=4)
    with torch.no_grad():
        torch.testing.assert_close(cond(x, t), cond(x, t, torch.full((3,), 4)))
        assert not torch.allclose(cond(x, t), cond(x, t, torch.tensor([0, 1, 2])))
        uncond = tiny()
        torch.testing.assert_close(uncond(x, t), uncond(x, t, torch.zeros(3, dtype=torch.long)))
    with pytest.raises(ValueError, match="unconditional model takes only the null label 0"):
        uncond(x, t, torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(3, 16\)"):
        uncond(x, t, None, torch.zeros(3, 15, dtype=torch.bool))


def test_a_mask_runs_the_blocks_on_the_visible_patches_only() -> None:
    """The blocks see the time token and the K visible patches; what the dropped patches hold does not
    change the output anywhere, and the output at dropped patches is zero."""
    model = tiny()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 500])
    mask = block_mask(2, 4, 0.5, block=2, generator=torch.Generator().manual_seed(0))
    seen = []
    model.mid_block.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    dropped = mask.view(2, 1, 4, 1, 4, 1).expand(-1, 3, -1, 2, -1, 2).reshape(2, 3, 8, 8)
    with torch.no_grad():
        out = model(x, t, None, mask)
        changed = model(torch.where(dropped, torch.randn_like(x), x), t, None, mask)
    assert seen[0] == (2, 1 + 8, 64)
    torch.testing.assert_close(out, changed)
    assert not out[dropped].any()
    assert out[~dropped].abs().sum() > 0


def test_masked_pass_costs_fewer_flops() -> None:
    full = model_stats("UViT-T/4", input_size=64).forward_flops
    masked = model_stats("UViT-T/4", 0.9, input_size=64).forward_flops
    assert masked < 0.2 * full  # a tenth of the 256 tokens (+ the time token) enter the blocks


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    grads = []
    for enabled in (False, True):
        model = tiny()
        model.set_activation_checkpointing(enabled)
        model(x, t).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
