"""Helpers shared by the model tests."""

from __future__ import annotations

import torch
from torch import nn

from mdt.models import create_model

FAMILIES_TINY = ["DiT-T/2", "MDT-T/2", "MDTv2-T/2", "MaskDiT-T/2"]


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter random values: zero-initialised gates would hide wiring mistakes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def tiny(name: str, input_size: int = 8, num_classes: int = 10, **kw) -> nn.Module:
    return randomize(create_model(name, input_size=input_size, num_classes=num_classes, **kw))


def inputs(batch: int = 3, channels: int = 4, size: int = 8, num_classes: int = 10, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    y = torch.randint(0, num_classes + 1, (batch,), generator=gen)
    return x, t, y


# A tiny diffusers DiTTransformer2DModel (tests/test_diffusers_dit.py, tests/test_import.py).
DIFFUSERS_TINY = dict(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=3,
                      sample_size=8, patch_size=2, num_embeds_ada_norm=10)


def fill(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter to randn * 0.2: zero-initialised gates and outputs would hide wiring mistakes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def tiny_diffusers(seed: int = 0, **overrides) -> nn.Module:
    """A random diffusers DiT whose blocks share one copy of the embedders, as a converted DiT has."""
    from diffusers import DiTTransformer2DModel

    transformer = DiTTransformer2DModel(**{**DIFFUSERS_TINY, **overrides}).eval()
    fill(transformer, seed)
    first = transformer.transformer_blocks[0].norm1.emb
    for block in transformer.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first.state_dict())
    return transformer
