"""Conversion between mdt's DiT and diffusers' DiTTransformer2DModel: equal outputs, exact refusals."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiTTransformer2DModel
from model_helpers import DIFFUSERS_TINY, fill, tiny_diffusers

from mdt.errors import UserError
from mdt.models import DiffusionTransformer, ModelConfig, load_pretrained, model_config, save_pretrained
from mdt.models.diffusers_dit import (
    config_from_diffusers,
    from_diffusers,
    match_original_dit,
    state_dict_from_diffusers,
    state_dict_to_diffusers,
    to_diffusers,
)

EMBED_KEY = "norm1.emb.timestep_embedder.linear_1.weight"


def tiny_mdt(seed: int = 1, **overrides) -> DiffusionTransformer:
    cfg = model_config("DiT-S/2", input_size=8, num_classes=10, hidden_size=64, depth=3, num_heads=4,
                       **overrides)
    model = DiffusionTransformer(cfg).eval()
    fill(model, seed)
    return model


def inputs(channels: int = 4):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, channels, 8, 8, generator=gen)
    t = torch.tensor([0.0, 999.0, 500.5, 1.0, 250.0, 0.0])
    y = torch.tensor([0, 10, 3, 9, 10, 5])  # 10 = null class
    return x, t, y


@torch.no_grad()
def outputs(model: DiffusionTransformer, transformer: DiTTransformer2DModel, channels: int = 4):
    x, t, y = inputs(channels)
    return model(x, t, y), transformer(x, timestep=t, class_labels=y).sample


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("norm_eps", [1e-5, 1e-6])  # 1e-5: diffusers' default, as in the published ports
def test_diffusers_to_mdt_gives_the_same_outputs(norm_eps):
    transformer = tiny_diffusers(norm_eps=norm_eps)
    model = from_diffusers(transformer)
    assert torch.equal(model.pos_embed, transformer.pos_embed.pos_embed)  # diffusers' own table, bit for bit
    match_original_dit(transformer)
    assert transformer.config.norm_eps == 1e-6  # its effect here is below 1e-5, so check the setting itself
    assert all(block.norm3.eps == 1e-6 for block in transformer.transformer_blocks)
    ours, theirs = outputs(model, transformer)
    assert ours.shape == (6, 8, 8, 8)  # learned-sigma channels included
    assert ours.std() > 0.5  # a real signal, not zeros
    assert max_diff(ours, theirs) < 1e-5


def test_state_dict_functions_verify_and_drop_a_saved_position_table(tmp_path):
    transformer = tiny_diffusers(seed=3)
    sd = {**transformer.state_dict(), "pos_embed.pos_embed": transformer.pos_embed.pos_embed}
    converted = state_dict_from_diffusers(sd, transformer.config)
    model = DiffusionTransformer(ModelConfig(**config_from_diffusers(transformer.config)))
    model.load_state_dict(converted, strict=True)
    save_pretrained(model, tmp_path)  # and through mdt's own format
    reloaded = load_pretrained(tmp_path)
    ours, theirs = outputs(reloaded, match_original_dit(transformer))
    assert max_diff(ours, theirs) < 1e-5


def test_unmatched_diffusers_differs_only_through_its_timestep_frequencies():
    """diffusers' DiT uses frequencies 10000^(-k/127), DiT 10000^(-k/128): equal at t = 0 only."""
    transformer = tiny_diffusers(norm_eps=1e-6)
    model = from_diffusers(transformer)
    ours, theirs = outputs(model, transformer)
    per_sample = (ours - theirs).abs().flatten(1).amax(1)
    assert per_sample[[0, 5]].max() < 1e-5  # t = 0
    assert per_sample[[1, 2, 4]].min() > 1e-2  # t = 999, 500.5, 250


def test_mdt_to_diffusers_and_save_pretrained_round_trip(tmp_path):
    model = tiny_mdt()
    transformer = to_diffusers(model)
    ours, theirs = outputs(model, transformer)
    assert ours.std() > 0.5
    assert max_diff(ours, theirs) < 1e-5

    transformer.save_pretrained(tmp_path)
    loaded = DiTTransformer2DModel.from_pretrained(tmp_path).eval()
    assert loaded.config.norm_eps == 1e-6
    assert loaded.config.out_channels == 8
    assert max_diff(*outputs(model, match_original_dit(loaded))) < 1e-5  # the frequency fix is not saved

    back = from_diffusers(loaded)
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_mdt_without_learned_sigma():
    model = tiny_mdt(learn_sigma=False)
    sd, config = state_dict_to_diffusers(model.state_dict(), model.config)
    assert config["out_channels"] == 4
    transformer = to_diffusers(model)
    ours, theirs = outputs(model, transformer)
    assert ours.shape == (6, 4, 8, 8)
    assert max_diff(ours, theirs) < 1e-5
    assert config_from_diffusers({**config, "out_channels": None})["learn_sigma"] is False


def test_refuses_untied_embedders_unknown_and_missing_keys():
    transformer = tiny_diffusers()
    config = dict(transformer.config)
    sd = transformer.state_dict()
    untied = {**sd, f"transformer_blocks.2.{EMBED_KEY}": sd[f"transformer_blocks.2.{EMBED_KEY}"] + 1e-3}
    with pytest.raises(UserError, match=f"transformer_blocks.2.{EMBED_KEY}"):
        state_dict_from_diffusers(untied, config)
    with pytest.raises(UserError, match="extra.weight"):
        state_dict_from_diffusers({**sd, "extra.weight": torch.zeros(1)}, config)
    with pytest.raises(UserError, match="transformer_blocks.1.attn1.to_k.bias"):
        missing = "transformer_blocks.1.attn1.to_k.bias"
        state_dict_from_diffusers({k: v for k, v in sd.items() if k != missing}, config)
    wide = {**sd, "pos_embed.proj.bias": torch.zeros(65)}
    with pytest.raises(UserError, match="x_embedder.proj.bias"):
        state_dict_from_diffusers(wide, config)
    shifted = {**sd, "pos_embed.pos_embed": transformer.pos_embed.pos_embed + 1}
    with pytest.raises(UserError, match="pos_embed.pos_embed"):
        state_dict_from_diffusers(shifted, config)


@pytest.mark.parametrize("setting", [
    {"norm_type": "ada_norm"}, {"activation_fn": "gelu"}, {"dropout": 0.1}, {"norm_eps": 1e-3},
    {"norm_elementwise_affine": True}, {"attention_bias": False}, {"sample_size": [8, 16]},
    {"out_channels": 6}, {"cross_attention_dim": 32}, {"some_new_option": 1},
])
def test_refuses_configs_mdt_cannot_represent(setting):
    key = next(iter(setting))
    with pytest.raises(UserError, match=key):
        config_from_diffusers({**DIFFUSERS_TINY, **setting})


def test_accepts_the_legacy_transformer2d_config_of_published_checkpoints():
    legacy = {"_class_name": "Transformer2DModel", "activation_fn": "gelu-approximate",
              "attention_bias": True, "attention_head_dim": 72, "cross_attention_dim": None, "dropout": 0.0,
              "in_channels": 4, "norm_elementwise_affine": False, "norm_num_groups": 32,
              "norm_type": "ada_norm_zero", "num_attention_heads": 16, "num_embeds_ada_norm": 1000,
              "num_layers": 28, "num_vector_embeds": None, "only_cross_attention": False, "out_channels": 8,
              "patch_size": 2, "sample_size": 32, "upcast_attention": False, "use_linear_projection": False}
    fields = config_from_diffusers(legacy)
    assert fields == {**fields, "name": "DiT-XL/2", "input_size": 32, "hidden_size": 1152, "depth": 28,
                      "num_heads": 16, "num_classes": 1000, "learn_sigma": True, "mlp_ratio": 4.0}


def test_refuses_mdt_models_diffusers_cannot_represent():
    mdt_family = DiffusionTransformer(model_config("MDT-T/2", input_size=8, num_classes=10))
    with pytest.raises(UserError, match="family"):
        to_diffusers(mdt_family)
    model = tiny_mdt()
    with torch.no_grad():
        model.pos_embed.add_(0.01)
    with pytest.raises(UserError, match="pos_embed"):
        to_diffusers(model)
    with pytest.raises(UserError, match="mlp_ratio"):
        to_diffusers(tiny_mdt(mlp_ratio=2.0))
