"""Checkpoint folders: mdt's own export folder (`export_folder`, written by `mdt train` and `mdt import`, read
by `mdt sample`, `mdt export` and `--init-from`), and checkpoints from and to other code bases: `mdt import`
(the official DiT, MDT, MDTv2, MaskDiT and MaskDM checkpoints, diffusers DiT folders) and `mdt export` (a
diffusers DiTPipeline folder).

It sits between the model layer and the stages: it may import models, diffusion and vae; sample and train
import it, and nothing it imports imports them.
"""
