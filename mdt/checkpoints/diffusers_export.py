"""`mdt export --format diffusers`: a DiT run or export -> a folder `DiTPipeline.from_pretrained` loads.

The folder holds the transformer (weights converted exactly, `mdt.models.diffusers_dit`), a DDIM
scheduler with the run's betas, the VAE the run's latents were encoded with (or `--vae`), whose
scaling factor must be the one the latents were scaled by (the pipeline divides by the VAE's own),
and `id2label` from the data manifest's class names.

What diffusers does not save: its DiT computes timestep features with other frequencies than DiT
(see `diffusers_dit`); after loading, `match_original_dit(pipe.transformer)` makes it compute what
mdt and DiT compute. `DiTPipeline` also takes the null class to be 1000, so it guides only
1000-class models.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from mdt.errors import UserError
from mdt.fileio import write_json
from mdt.models.io import load_pretrained


def export_diffusers_pipeline(source: str | Path, out: str | Path, *, vae: str | None = None) -> Path:
    from diffusers import DDIMScheduler, DiTPipeline

    from mdt.checkpoints.export_folder import read_checkpoint
    from mdt.diffusion.schedule import make_betas
    from mdt.models.diffusers_dit import to_diffusers
    from mdt.vae import load_autoencoder

    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; pass a new folder for the diffusers export")
    checkpoint = read_checkpoint(source)
    family = checkpoint.model_config.get("family")
    if family != "dit":
        raise UserError(f"{checkpoint.export_dir} is a {family} model; diffusers' DiTPipeline holds DiT models only")
    recorded = (checkpoint.manifest or {}).get("vae") or {}
    spec = vae or recorded.get("spec")
    if spec is None:
        raise UserError(f"{checkpoint.export_dir} records no VAE (no data_manifest.json); pass --vae with the VAE "
                        "the model was trained with")
    autoencoder = load_autoencoder(spec, device="cpu", dtype=torch.float32)
    if autoencoder.module is None:
        raise UserError(f"--vae {spec}: the model works in pixel space, but DiTPipeline decodes with a VAE")
    if "scaling_factor" in recorded and abs(autoencoder.scaling_factor - float(recorded["scaling_factor"])) > 1e-6:
        raise UserError(f"--vae {spec} has scaling factor {autoencoder.scaling_factor} but the latents were scaled "
                        f"by {recorded['scaling_factor']}; pass the VAE the data was encoded with")
    if autoencoder.shift_factor:
        raise UserError(f"--vae {spec} has a shift factor, which DiTPipeline does not apply; use an SD-style VAE")

    model = load_pretrained(checkpoint.export_dir)
    diffusion = checkpoint.diffusion
    scheduler = DDIMScheduler(num_train_timesteps=diffusion.num_timesteps, trained_betas=make_betas(diffusion).tolist(),
                              prediction_type=diffusion.prediction_type, clip_sample=False)
    pipeline = DiTPipeline(transformer=to_diffusers(model), vae=autoencoder.module, scheduler=scheduler)
    staging = out.with_name(f".{out.name}.exporting")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        pipeline.save_pretrained(staging, safe_serialization=True)
        if checkpoint.class_names:  # DiTPipeline reads it back into pipe.labels
            index_path = staging / "model_index.json"
            index = json.loads(index_path.read_text())
            index["id2label"] = {str(i): name for i, name in enumerate(checkpoint.class_names)}
            write_json(index_path, index)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
