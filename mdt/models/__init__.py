"""Diffusion transformers: DiT, MDT, MDTv2 and MaskDiT from one configurable model; MaskDM's U-ViT."""

from mdt.models.config import ModelConfig
from mdt.models.io import load_pretrained, read_model_config, save_pretrained
from mdt.models.masking import MASKERS, block_mask, crop_mask, kept_indices, random_mask
from mdt.models.registry import build_model, create_model, list_models, model_config
from mdt.models.transformer import DiffusionTransformer

__all__ = [
    "MASKERS", "DiffusionTransformer", "ModelConfig", "block_mask", "build_model", "create_model", "crop_mask", "kept_indices",
    "list_models", "load_pretrained", "model_config", "random_mask", "read_model_config", "save_pretrained",
]
