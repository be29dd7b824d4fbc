"""Convert weights between mdt's DiT and diffusers' `DiTTransformer2DModel`, refusing what is not exact.

Why: published DiT checkpoints (facebook/DiT-XL-2-*) and `DiTPipeline` use diffusers' layout.

diffusers' port departs from DiT (and mdt) numerically in two places (diffusers 0.42; the rest is
op for op the same, the position table bit for bit):
- Timestep features: `CombinedTimestepLabelEmbeddings` hard-codes `Timesteps(256, flip_sin_to_cos=True,
  downscale_freq_shift=1)`: frequencies 10000^(-k/127) where DiT uses 10000^(-k/128). No config setting
  reaches it. The features agree at t = 0 and differ by up to 0.0027 at t = 1, 0.70 at t = 250 and 1.94
  at t = 999. mdt has no such option, so a model trained in diffusers cannot be represented exactly.
  `match_original_dit` sets the shift to 0 on a transformer's modules (exact then); diffusers does not
  save that attribute, so apply it again after `from_pretrained`.
- The MLP's LayerNorm (`norm3`) takes `norm_eps`, default 1e-5 (DiT: 1e-6, as are diffusers' other
  norms); published DiT ports inherit 1e-5. It is a config setting: `to_diffusers` writes 1e-6 (saved).

Weights map one to one (q, k, v fuse into qkv). diffusers keeps a copy of the timestep and class
embedders in every block; mdt keeps one, so the copies must be equal. `pos_embed` is not in diffusers'
state_dict: both sides recompute the same sin-cos table.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mdt.errors import UserError
from mdt.models.config import ModelConfig
from mdt.models.embeddings import sincos_pos_embed_2d
from mdt.models.registry import FAMILY_PATCHES, SIZES
from mdt.models.transformer import DiffusionTransformer

if TYPE_CHECKING:
    from diffusers import DiTTransformer2DModel

DIT_NORM_EPS = 1e-6
EMBED = "norm1.emb."  # where each diffusers block keeps its copy of the conditioning embedders
# The settings mdt's DiT converts, with the values it supports. The second group comes from the legacy
# `Transformer2DModel` config that the published checkpoints carry; DiT leaves them at these values.
SUPPORTED: dict[str, tuple] = {
    "norm_type": ("ada_norm_zero",), "activation_fn": ("gelu-approximate",), "dropout": (0.0,),
    "attention_bias": (True,), "norm_elementwise_affine": (False,), "norm_eps": (1e-6, 1e-5),
    "upcast_attention": (False, True),  # unused by SDPA; it would only matter for fp16 attention scores
    "cross_attention_dim": (None,), "num_vector_embeds": (None,), "only_cross_attention": (False,),
    "double_self_attention": (False,), "attention_type": ("default",), "caption_channels": (None,),
    "interpolation_scale": (None, 1), "use_additional_conditions": (None, False),
    "use_linear_projection": (False, True),  # only used for unpatched inputs
}
FREE = {"num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers",
        "sample_size", "patch_size", "num_embeds_ada_norm", "norm_num_groups"}  # norm_num_groups: unused


def _refuse(key: str, value: Any, supported: str) -> UserError:
    return UserError(f"diffusers setting {key}={value!r} has no exact equivalent in mdt's DiT, "
                     f"which supports {key} = {supported}")


def _pairs(depth: int) -> list[tuple[str, str]]:
    """(mdt, diffusers) names of the tensors that map one to one."""
    mods = [("x_embedder.proj", "pos_embed.proj"), ("final_layer.adaLN_modulation.1", "proj_out_1"),
            ("final_layer.linear", "proj_out_2")]
    for i in range(depth):
        m, d = f"encoder.blocks.{i}.", f"transformer_blocks.{i}."
        mods += [(m + "attn.proj", d + "attn1.to_out.0"), (m + "mlp.fc1", d + "ff.net.0.proj"),
                 (m + "mlp.fc2", d + "ff.net.2"), (m + "adaLN_modulation.1", d + "norm1.linear")]
    return [(f"{m}.{p}", f"{d}.{p}") for m, d in mods for p in ("weight", "bias")]


# (mdt key, diffusers key under each block's `norm1.emb.`) of the shared conditioning embedders.
EMBEDDERS = [(f"t_embedder.mlp.{m}.{p}", f"timestep_embedder.linear_{d}.{p}")
             for m, d in ((0, 1), (2, 2)) for p in ("weight", "bias")]
EMBEDDERS.append(("y_embedder.table.weight", "class_embedder.embedding_table.weight"))


def _taker(src: dict[str, Tensor], why: str) -> Callable[[str], Tensor]:
    def take(key: str) -> Tensor:
        if key not in src:
            raise UserError(f"the weights lack {key!r}, which {why} needs")
        return src.pop(key)
    return take


def config_from_diffusers(transformer_config: Mapping[str, Any]) -> dict[str, Any]:
    """The mdt `ModelConfig` fields of a diffusers DiT config; a UserError names what mdt cannot represent."""
    from diffusers import DiTTransformer2DModel

    params = inspect.signature(DiTTransformer2DModel.__init__).parameters
    cfg = {n: p.default for n, p in params.items() if n != "self"}  # what diffusers fills in for absent keys
    cfg.update((k, v) for k, v in transformer_config.items() if not k.startswith("_"))
    for key, value in cfg.items():
        if key in SUPPORTED and value not in SUPPORTED[key]:
            raise _refuse(key, value, " or ".join(map(repr, SUPPORTED[key])))
        if key not in SUPPORTED and key not in FREE:
            raise UserError(f"diffusers setting {key!r} is unknown to mdt's DiT converter, which supports "
                            "DiTTransformer2DModel configs (and legacy Transformer2DModel DiT configs) only")
    size, patch, ins, outs = cfg["sample_size"], cfg["patch_size"], cfg["in_channels"], cfg["out_channels"]
    if not isinstance(size, int):
        raise _refuse("sample_size", size, "one integer (square latents)")
    if not isinstance(patch, int):
        raise _refuse("patch_size", patch, "an integer")
    if cfg["num_embeds_ada_norm"] is None:
        raise _refuse("num_embeds_ada_norm", None, "the number of classes")
    if outs not in (None, ins, 2 * ins):
        raise _refuse("out_channels", outs, f"in_channels ({ins}) or twice it (learned sigma)")
    depth, heads = cfg["num_layers"], cfg["num_attention_heads"]
    width = heads * cfg["attention_head_dim"]
    preset = next((s for s, arch in SIZES.items() if arch == (depth, width, heads)), None)
    known = preset and patch in FAMILY_PATCHES["DiT"]
    fields = dict(name=f"DiT-{preset}/{patch}" if known else f"DiT-{depth}x{width}/{patch}", family="dit",
                  input_size=size, in_channels=ins, patch_size=patch, hidden_size=width, depth=depth,
                  num_heads=heads, mlp_ratio=4.0,  # diffusers' FeedForward is always 4x wide (mult=4)
                  num_classes=cfg["num_embeds_ada_norm"], learn_sigma=outs == 2 * ins)
    try:
        ModelConfig(**fields)
    except ValueError as err:
        raise UserError(f"the diffusers DiT config does not make a valid mdt model: {err}") from err
    return fields


def state_dict_from_diffusers(sd: Mapping[str, Tensor],
                              transformer_config: Mapping[str, Any]) -> dict[str, Tensor]:
    """diffusers DiT weights -> mdt DiT weights; every tensor is used once, or verified and dropped."""
    cfg = ModelConfig(**config_from_diffusers(transformer_config))
    src = dict(sd)
    take = _taker(src, f"a {cfg.depth}-layer diffusers DiT")
    out = {m: take(d) for m, d in _pairs(cfg.depth)}
    for i in range(cfg.depth):
        for p in ("weight", "bias"):
            out[f"encoder.blocks.{i}.attn.qkv.{p}"] = torch.cat(
                [take(f"transformer_blocks.{i}.attn1.to_{c}.{p}") for c in "qkv"])
    for mdt_key, suffix in EMBEDDERS:
        out[mdt_key] = take(f"transformer_blocks.0.{EMBED}{suffix}")
        for i in range(1, cfg.depth):
            if not torch.equal(take(f"transformer_blocks.{i}.{EMBED}{suffix}"), out[mdt_key]):
                raise UserError(f"diffusers weight transformer_blocks.{i}.{EMBED}{suffix} differs from block "
                                "0's copy; mdt's DiT supports one timestep and class embedder for all blocks")
    out["pos_embed"] = sincos_pos_embed_2d(cfg.hidden_size, cfg.grid_size)[None]
    saved = src.pop("pos_embed.pos_embed", None)  # not saved by diffusers; verified and dropped if present
    if saved is not None and not torch.equal(saved.cpu().float(), out["pos_embed"]):
        raise UserError("diffusers weight 'pos_embed.pos_embed' is not the fixed sin-cos table; "
                        "mdt's DiT supports only that table")
    if src:
        raise UserError(f"diffusers weight {sorted(src)[0]!r} (one of {len(src)} unknown) has no place in "
                        "mdt's DiT, which converts DiTTransformer2DModel weights only")
    with torch.device("meta"):
        expected = DiffusionTransformer(cfg).state_dict()
    for key, ref in expected.items():
        if out[key].shape != ref.shape:
            raise UserError(f"diffusers weights for mdt's {key} have shape {tuple(out[key].shape)}, but "
                            f"their config implies {tuple(ref.shape)}")
    return out


def config_to_diffusers(cfg: ModelConfig) -> dict[str, Any]:
    """The `DiTTransformer2DModel` config of an mdt DiT; a UserError names what diffusers cannot represent."""
    plain = dict(family="dit", restore="none", rel_pos_bias=False, long_skips=False, input_skip=False)
    for key, value in plain.items():
        if getattr(cfg, key) != value:
            raise UserError(f"mdt model {cfg.name} has {key}={getattr(cfg, key)!r}; diffusers' DiT "
                            f"supports only {key}={value!r} (a plain DiT)")
    if int(cfg.hidden_size * cfg.mlp_ratio) != 4 * cfg.hidden_size:
        raise UserError(f"mdt model {cfg.name} has mlp_ratio={cfg.mlp_ratio}; diffusers' DiT supports only 4")
    return dict(num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
                in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
                dropout=0.0, attention_bias=True, sample_size=cfg.input_size, patch_size=cfg.patch_size,
                activation_fn="gelu-approximate", num_embeds_ada_norm=cfg.num_classes, upcast_attention=False,
                norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_eps=DIT_NORM_EPS)


def state_dict_to_diffusers(sd: Mapping[str, Tensor],
                            mdt_config: ModelConfig) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """mdt DiT weights -> (diffusers weights, `DiTTransformer2DModel` config)."""
    cfg, config, src = mdt_config, config_to_diffusers(mdt_config), dict(sd)
    take = _taker(src, cfg.name)
    pos = take("pos_embed")
    if not torch.equal(pos.cpu(), sincos_pos_embed_2d(cfg.hidden_size, cfg.grid_size)[None].to(pos.dtype)):
        raise UserError("mdt weight 'pos_embed' is not the fixed sin-cos table that diffusers recomputes; "
                        "diffusers' DiT supports only that table")
    out = {d: take(m) for m, d in _pairs(cfg.depth)}
    for i in range(cfg.depth):
        for p in ("weight", "bias"):
            parts = take(f"encoder.blocks.{i}.attn.qkv.{p}").chunk(3)
            for c, part in zip("qkv", parts, strict=True):  # cloned: safetensors refuses shared storage
                out[f"transformer_blocks.{i}.attn1.to_{c}.{p}"] = part.clone()
    for mdt_key, suffix in EMBEDDERS:
        value = take(mdt_key)
        for i in range(cfg.depth):
            out[f"transformer_blocks.{i}.{EMBED}{suffix}"] = value if i == 0 else value.clone()
    if src:
        raise UserError(f"mdt weight {sorted(src)[0]!r} (one of {len(src)} unknown) has no place in "
                        "diffusers' DiT, which supports plain DiT weights only")
    return out, config


def match_original_dit(transformer: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """Make a diffusers DiT compute what DiT and mdt compute: timestep frequencies 10000^(-k/128)
    (diffusers does not save this: reapply after loading) and MLP LayerNorm eps 1e-6 (saved)."""
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
        block.norm3.eps = DIT_NORM_EPS
    defaults = [k for k in transformer.config.get("_use_default_values", []) if k != "norm_eps"]
    transformer.register_to_config(norm_eps=DIT_NORM_EPS, _use_default_values=defaults)
    return transformer


def to_diffusers(model: DiffusionTransformer, *, original_dit: bool = True) -> DiTTransformer2DModel:
    """A `DiTTransformer2DModel` (eval mode, the model's device and dtype) with the model's weights;
    with `original_dit` (see `match_original_dit`) its outputs equal the model's."""
    from diffusers import DiTTransformer2DModel

    sd, config = state_dict_to_diffusers(model.state_dict(), model.config)
    transformer = DiTTransformer2DModel(**config)
    transformer.load_state_dict(sd, strict=True)
    weight = model.x_embedder.proj.weight
    transformer = transformer.to(weight.device).eval()
    if weight.dtype != torch.float32:  # diffusers warns about any dtype given to .to()
        transformer = transformer.to(weight.dtype)
    return match_original_dit(transformer) if original_dit else transformer


def from_diffusers(transformer: DiTTransformer2DModel) -> DiffusionTransformer:
    """An mdt DiT (eval mode, the transformer's device and dtype) with a diffusers DiT's weights."""
    config = dict(transformer.config)
    model = DiffusionTransformer(ModelConfig(**config_from_diffusers(config)))
    model.load_state_dict(state_dict_from_diffusers(transformer.state_dict(), config), strict=True)
    weight = transformer.pos_embed.proj.weight
    return model.to(device=weight.device, dtype=weight.dtype).eval()
