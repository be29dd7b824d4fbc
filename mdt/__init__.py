"""mdt: train and sample masked latent diffusion transformers (MDT, MDTv2, MaskDiT, DiT)."""

__version__ = "0.1.0"
