"""Make golden fixtures (tests/fixtures/official/maskdit_vae*) with MaskDiT's OFFICIAL autoencoder code.

Source: Anima-Lab/MaskDiT 73cfb96ca9c6d1d78ab567ffeea099f96692a6e4, autoencoder.py (borrowed there from U-ViT).
Only that file is needed; extract it outside this repository and point --maskdit at the folder::

    git --git-dir MaskDiT.git archive 73cfb96ca9c6d1d78ab567ffeea099f96692a6e4 autoencoder.py \
        | tar -x -C /tmp/official/maskdit-vae
    .venv/bin/python tools/make_maskdit_vae_fixtures.py --maskdit /tmp/official/maskdit-vae

The file is imported from its path under the name ``autoencoder`` (needs einops) and leaves sys.modules
afterwards. Fixtures:

* maskdit_vae.pth: the state_dict of a TINY official FrozenAutoencoderKL (plain tensors, what
  ``torch.load(weights_only=True)`` reads; the same layout as assets/stable_diffusion/autoencoder_kl.pth).
  Tiny ddconfig: ch 32 (GroupNorm has 32 groups), ch_mult (1, 2, 2), 1 res block, z_channels = embed_dim = 4,
  16 px -> 4x4x4 latents. Every tensor is a distinct window of one of two seeded random buffers (norm
  weights around 1, the rest around 0), so no two tensors are equal while the file stays small (torch.save
  stores a shared buffer once). The official class then loads this file itself (its strict key check passes).
* maskdit_vae.safetensors: input.pixels (2, 3, 16, 16) in [-1, 1] and the official encode_moments split as
  sample() splits it (encode.mean, encode.std); input.latents (2, 4, 4, 4), SCALED as the diffusion model
  produces them, and the official decode(latents) (decode.pixels, not clamped). Metadata "fixture" (JSON):
  the tiny ddconfig, and the diffusers config.json of the tiny model and of the real one (official
  get_model's ddconfig), both made with diffusers' own create_vae_diffusers_config_from_ldm.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import sys
import warnings
from pathlib import Path

import torch

from fixture_utils import atomic_write, check_checkout, save_fixture

MASKDIT_COMMIT = "73cfb96ca9c6d1d78ab567ffeea099f96692a6e4"
SEED = 0
WEIGHT_STD = 0.05
TINY_DDCONFIG = dict(
    double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
    num_res_blocks=1, attn_resolutions=[], dropout=0.0,
)
TINY_EMBED_DIM = 4
OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "official"


def import_autoencoder(folder: Path):
    spec = importlib.util.spec_from_file_location("autoencoder", folder / "autoencoder.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["autoencoder"] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["autoencoder"]
    return module


def official_real_config(ae) -> tuple[dict, int, float]:
    """(ddconfig, embed_dim, scale_factor) that the official get_model builds with, captured, nothing loaded."""
    captured = {}

    def capture(ddconfig, embed_dim, pretrained_path, scale_factor=0.18215):
        captured.update(ddconfig=ddconfig, embed_dim=embed_dim, scale_factor=scale_factor)

    real_class, ae.FrozenAutoencoderKL = ae.FrozenAutoencoderKL, capture
    try:
        ae.get_model("unused.pth")
    finally:
        ae.FrozenAutoencoderKL = real_class
    return captured["ddconfig"], captured["embed_dim"], captured["scale_factor"]


def diffusers_config(ddconfig: dict, embed_dim: int, scale_factor: float) -> dict:
    from diffusers.loaders.single_file_utils import create_vae_diffusers_config_from_ldm

    # diffusers' AutoencoderKL has one width for z and the quant convs.
    assert embed_dim == ddconfig["z_channels"], "diffusers' AutoencoderKL needs embed_dim == z_channels"
    ldm = {"model": {"params": {"first_stage_config": {"params": {"ddconfig": ddconfig}}}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # image_size is deprecated there, but we want the recorded size
        return create_vae_diffusers_config_from_ldm(ldm, {}, ddconfig["resolution"], scale_factor)


def layout(ae) -> dict[str, torch.Tensor]:
    """Keys and shapes of FrozenAutoencoderKL's state_dict, built as its __init__ builds them."""
    parts = {
        "encoder": ae.Encoder(**TINY_DDCONFIG),
        "decoder": ae.Decoder(**TINY_DDCONFIG),
        "quant_conv": torch.nn.Conv2d(2 * TINY_DDCONFIG["z_channels"], 2 * TINY_EMBED_DIM, 1),
        "post_quant_conv": torch.nn.Conv2d(TINY_EMBED_DIM, TINY_DDCONFIG["z_channels"], 1),
    }
    return {f"{name}.{key}": value for name, part in parts.items() for key, value in part.state_dict().items()}


def random_state_dict(shapes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor a window at its own offset into one seeded buffer (GroupNorm weights: a second one)."""
    def is_norm_weight(key: str) -> bool:
        return key.endswith(".weight") and shapes[key].ndim == 1 and ".norm" in key

    def buffer(keys: list[str], std: float, mean: float) -> torch.Tensor:
        return mean + std * torch.randn(max(shapes[k].numel() for k in keys) + len(keys))

    torch.manual_seed(SEED)
    groups = {True: [k for k in shapes if is_norm_weight(k)], False: [k for k in shapes if not is_norm_weight(k)]}
    sources = {False: buffer(groups[False], WEIGHT_STD, 0.0), True: buffer(groups[True], 0.1, 1.0)}
    state = {}
    for norm, keys in groups.items():
        for offset, key in enumerate(keys):
            state[key] = sources[norm][offset : offset + shapes[key].numel()].view(shapes[key].shape)
    return {key: state[key] for key in shapes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maskdit", type=Path, required=True, help="folder holding the official autoencoder.py")
    args = parser.parse_args()
    check_checkout(args.maskdit, MASKDIT_COMMIT)
    torch.set_num_threads(1)
    ae = import_autoencoder(args.maskdit)

    state = random_state_dict(layout(ae))
    pth = OUT / "maskdit_vae.pth"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(pth, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))

    official = ae.FrozenAutoencoderKL(TINY_DDCONFIG, TINY_EMBED_DIM, str(pth))  # asserts an exact key match
    torch.manual_seed(SEED)
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        mean, logvar = torch.chunk(official.encode_moments(pixels), 2, dim=1)
        std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))  # as official sample() does
        decoded = official.decode(latents)
    inside = (decoded.abs() < 1).float().mean().item()
    assert inside > 0.5, f"only {inside:.0%} of decoded pixels lie in (-1, 1): clamping would hide errors"

    real = official_real_config(ae)
    meta = {
        "source": f"Anima-Lab/MaskDiT {MASKDIT_COMMIT} autoencoder.py",
        "seed": SEED,
        "tiny_ddconfig": TINY_DDCONFIG,
        "tiny_embed_dim": TINY_EMBED_DIM,
        "tiny_diffusers_config": diffusers_config(TINY_DDCONFIG, TINY_EMBED_DIM, official.scale_factor),
        "real_ddconfig": real[0],
        "real_diffusers_config": diffusers_config(*real),
        "decoded_inside_unit_interval": inside,
    }
    tensors = {
        "input.pixels": pixels, "encode.mean": mean, "encode.std": std,
        "input.latents": latents, "decode.pixels": decoded,
    }
    save_fixture(OUT / "maskdit_vae.safetensors", tensors, meta)


if __name__ == "__main__":
    main()
