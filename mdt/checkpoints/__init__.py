"""Checkpoints from and to other code bases: `mdt import` (the official DiT, MDT, MDTv2, MaskDiT and MaskDM
checkpoints, diffusers DiT folders) and `mdt export` (a diffusers DiTPipeline folder).

It sits above the library: it may import models, diffusion, sample and vae, and nothing in those imports it.
mdt's own export folder is read and written by `mdt.models.io` (model) and `mdt.sample.checkpoint` (the rest).
"""
