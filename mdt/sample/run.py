"""A sampling run: checkpoint -> guided sampler -> VAE decode -> PNGs, npz, grid, config.

Written as if for one process; the distributed part is only *which* batches a rank makes. Sample
i is a function of (settings, i) alone, and it is always computed in the same fixed batch, so any
number of processes and any number of interruptions give the same bytes for a given batch size.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mdt import distributed as dist
from mdt.checkpoints.export_folder import Checkpoint, read_checkpoint
from mdt.compiling import compile_wanted, maybe_compile
from mdt.diffusion.edm import EDMConfig, karras_sigmas
from mdt.diffusion.respacing import SPACINGS, sampling_timesteps
from mdt.errors import UserError
from mdt.fileio import read_json_object, write_json
from mdt.locking import exclusive_folder
from mdt.precision import autocast, sampling_mode, set_tf32
from mdt.sample.config import ETA_SAMPLERS, SampleConfig
from mdt.sample.guidance import ClassifierFreeGuidance
from mdt.sample.images import read_png, sample_path, to_uint8, write_grid, write_npz, write_png
from mdt.sample.samplers import CLIP_SAMPLERS, EDM_SAMPLERS, IMAGENET_CHURN, SAMPLERS, Churn
from mdt.sample.seeding import class_labels, initial_noise, noise_generators, parse_classes, per_sample_noise

GRID_SIZE = 64
CONFIG_FILE = "sample_config.json"
# Settings that change the pixels; a resumed run must agree on all of them.
_IDENTITY_KEYS = ("checkpoint", "sampler", "steps", "spacing", "eta", "churn", "clip_x0", "guidance", "classes", "seed",
                  "vae", "precision")


@dataclass
class SampleResult:
    out: Path
    num_samples: int
    generated: int  # on all ranks, this run (resumed samples excluded)
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0


def _visited_points(config: SampleConfig, checkpoint: Checkpoint) -> list[int] | list[float]:
    """DDPM timesteps (ascending) or EDM sigmas (descending to 0), refusing a sampler of the other kind."""
    diffusion, edm_sampler = checkpoint.diffusion, config.sampler in EDM_SAMPLERS
    steps = config.resolved_steps
    if isinstance(diffusion, EDMConfig):
        if not edm_sampler:
            raise UserError(f"--sampler {config.sampler} samples DDPM models, but {checkpoint.export_dir} is an EDM "
                            f"model (MaskDiT); use --sampler {EDM_SAMPLERS[0]}.")
        if config.guidance.schedule != "constant":
            raise UserError(f"--cfg-schedule {config.guidance.schedule} is defined over DDPM timesteps; EDM models "
                            "take a constant --cfg-scale.")
        if steps < 2:
            raise UserError(f"--steps {steps}: the EDM sampler needs at least 2 steps.")
        return karras_sigmas(diffusion, steps)
    if edm_sampler:
        raise UserError(f"--sampler {config.sampler} samples EDM models, but {checkpoint.export_dir} is a DDPM model; "
                        "use ddpm, ddim or dpm++.")
    if config.churn:
        raise UserError("--churn belongs to the EDM sampler; DDPM's ancestral sampler is stochastic already.")
    kind = ((checkpoint.manifest or {}).get("vae") or {}).get("kind")
    if config.sampler == "maskdm-ddim" and kind not in (None, "pixel"):
        raise UserError(f"--sampler maskdm-ddim clips x0 to the pixel range [-1, 1], but {checkpoint.export_dir} "
                        f"models {kind} latents, which are unbounded; use ddim.")
    if not 1 <= steps <= diffusion.num_timesteps:
        raise UserError(f"--steps {steps} is out of range; pick 1..{diffusion.num_timesteps}.")
    try:
        return sampling_timesteps(diffusion.num_timesteps, steps, config.resolved_spacing)
    except ValueError as err:
        raise UserError(f"--steps {steps} --spacing {config.resolved_spacing}: {err}.") from None


def _validate(config: SampleConfig, checkpoint: Checkpoint) -> list[int] | list[float]:
    """Check the settings; the timesteps (DDPM) or sigmas (EDM) the sampler visits."""
    if config.sampler not in SAMPLERS:
        raise UserError(f"--sampler {config.sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}.")
    if config.spacing is not None and config.spacing not in SPACINGS:
        raise UserError(f"--spacing {config.spacing!r} is unknown; choose one of {', '.join(SPACINGS)}.")
    if config.eta is not None and config.sampler not in ETA_SAMPLERS:
        raise UserError(f"--eta belongs to the DDIM samplers ({', '.join(ETA_SAMPLERS)}), not --sampler {config.sampler}.")
    if config.eta is not None and not 0.0 <= config.eta <= 1.0:
        raise UserError(f"--eta {config.eta} is out of range; DDIM's eta lies in [0, 1] (0: deterministic).")
    if config.churn < 0:
        raise UserError(f"--churn {config.churn} must be at least 0.")
    timesteps = _visited_points(config, checkpoint)
    if config.num_samples < 1:
        raise UserError(f"--num-samples {config.num_samples} must be at least 1.")
    if config.batch_size < 1:
        raise UserError(f"--batch-size {config.batch_size} must be at least 1.")
    sampling_mode(config.precision)  # a mode's name, or one sentence naming them
    g = config.guidance
    if g.scale < 1.0:
        raise UserError(f"--cfg-scale {g.scale} is below 1; use 1 for no guidance or a larger value to guide.")
    c = checkpoint.latent_shape[0]
    if g.channels is not None and not 1 <= g.channels <= c:
        raise UserError(f"--cfg-channels {g.channels} is out of range; the latents have {c} channels.")
    if g.enabled and checkpoint.num_classes < 1:
        raise UserError("--cfg-scale needs a class-conditional model; this checkpoint has no classes, use 1.")
    return timesteps


def _load_autoencoder(checkpoint: Checkpoint, override: str | None, device: torch.device) -> Any:
    from mdt.vae import load_autoencoder

    recorded = (checkpoint.manifest or {}).get("vae") or {}
    spec = override or recorded.get("spec")
    if spec is None:
        raise UserError(
            f"{checkpoint.export_dir} records no VAE (no data_manifest.json); pass --vae with the VAE the latents were encoded with."
        )
    # The architecture folder the latents were encoded with (a single .safetensors or .pth file's).
    vae = load_autoencoder(spec, device=device, config=None if override else recorded.get("config"))
    channels, size, _ = checkpoint.latent_shape
    if vae.latent_channels != channels:
        raise UserError(f"--vae {spec} makes {vae.latent_channels}-channel latents but the model takes {channels}; pass the VAE the data was encoded with.")
    if "kind" in recorded and vae.kind != recorded["kind"]:
        raise UserError(f"--vae {spec} is a {vae.kind} decoder but the latents were made by a {recorded['kind']} one; pass the VAE the data was encoded with.")
    if "scaling_factor" in recorded and abs(vae.scaling_factor - float(recorded["scaling_factor"])) > 1e-6:
        raise UserError(f"--vae {spec} has scaling factor {vae.scaling_factor} but the latents were scaled by {recorded['scaling_factor']}; pass the VAE the data was encoded with.")
    resolution = (checkpoint.manifest or {}).get("resolution")
    if resolution is not None and size * vae.downsample != int(resolution):
        raise UserError(f"--vae {spec} decodes {size}x{size} latents to {size * vae.downsample} px but the data was {resolution} px; pass the VAE the data was encoded with.")
    return vae


def _clip_x0(config: SampleConfig, vae_kind: str) -> bool:
    """Whether ddpm/ddim clamp the predicted x0 to [-1, 1]: as ADM does for pixel models (clip_denoised) and
    DiT's sample.py does not for latents, unless --clip-x0/--no-clip-x0 says otherwise."""
    if config.clip_x0 is None:
        return vae_kind == "pixel" and config.sampler in CLIP_SAMPLERS
    if config.clip_x0 and config.sampler not in CLIP_SAMPLERS:
        raise UserError(f"--clip-x0 belongs to the samplers {', '.join(CLIP_SAMPLERS)}, not --sampler {config.sampler}.")
    if config.clip_x0 and vae_kind != "pixel":
        raise UserError(f"--clip-x0 clamps x0 to the pixel range [-1, 1], but these are {vae_kind} latents, which "
                        "are unbounded; drop --clip-x0.")
    return bool(config.clip_x0)


def _run_record(config: SampleConfig, checkpoint: Checkpoint, timesteps: list[int] | list[float], vae_spec: str,
                clip_x0: bool, device: torch.device) -> dict[str, Any]:
    return {
        "checkpoint": str(checkpoint.export_dir.resolve()),
        "sampler": config.sampler,
        "steps": config.resolved_steps,
        "spacing": config.resolved_spacing,
        "eta": config.resolved_eta,
        "churn": config.churn,
        "clip_x0": clip_x0,
        "guidance": asdict(config.guidance),
        "classes": config.classes,
        "seed": config.seed,
        "vae": vae_spec,
        "precision": config.precision,
        "batch_size": config.batch_size,
        "compiled": compile_wanted(config.compile, device),
        "num_samples": config.num_samples,
        "model_config": checkpoint.model_config,
        "class_names": checkpoint.class_names,
        "diffusion": checkpoint.diffusion.to_dict(),
        "timesteps": timesteps,
        "seeding": "sample i: torch CPU generators seeded by numpy SeedSequence(seed, spawn_key=(i, stream))",
    }


def _check_resumable(out: Path, record: dict[str, Any]) -> None:
    path = out / CONFIG_FILE
    if not path.is_file():
        if any(out.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png")):
            raise UserError(f"--out {out} already holds sample PNGs from an unknown run; choose an empty folder.")
        return
    previous = read_json_object(path, "choose a new --out, or empty this folder to sample into it again")
    previous.setdefault("eta", 0.0 if previous.get("sampler") == "ddim" else None)  # runs from before --eta
    previous.setdefault("clip_x0", False)  # runs from before --clip-x0 did not clip
    changed = [k for k in _IDENTITY_KEYS if previous.get(k) != record[k]]
    if changed:
        raise UserError(
            f"--out {out} holds samples made with different {', '.join(changed)}; use a new --out or the same settings to resume."
        )
    if previous.get("batch_size") != record["batch_size"]:
        dist.print0(
            f"note: resuming with --batch-size {record['batch_size']} (was {previous.get('batch_size')}); new images "
            "may differ from an uninterrupted run in the last float bits, as forward shapes changed."
        )
    if previous.get("compiled", False) != record["compiled"]:
        dist.print0("note: resuming with torch.compile " + ("on" if record["compiled"] else "off") + "; new images "
                    "may differ from an uninterrupted run in the last float bits (other kernels).")


def run_sampling(config: SampleConfig) -> SampleResult:
    """Make samples 0..N-1 that are not yet in `config.out`, split over all ranks; one sampling run
    per folder at a time (a second is refused, naming the first)."""
    config.validate()
    dist.init()
    if config.out.exists() and not config.out.is_dir():
        raise UserError(f"--out {config.out} is a file; choose a folder for the samples.")
    with exclusive_folder(config.out, "--out"):
        return _sample_locked(config)


def _sample_locked(config: SampleConfig) -> SampleResult:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(config.device) if config.device else dist.default_device()
    checkpoint = read_checkpoint(config.ckpt)
    timesteps = _validate(config, checkpoint)
    classes = parse_classes(config.classes, checkpoint.num_classes)
    vae = _load_autoencoder(checkpoint, config.vae, device)
    clip_x0 = _clip_x0(config, vae.kind)
    record = _run_record(config, checkpoint, timesteps, vae.spec, clip_x0, device)

    from mdt.models import load_pretrained

    model = load_pretrained(checkpoint.export_dir, device=device)
    maybe_compile(model, config.compile, device)
    denoiser = ClassifierFreeGuidance(
        model,
        config.guidance,
        null_class=checkpoint.num_classes,
        num_timesteps=getattr(checkpoint.diffusion, "num_timesteps", 1),  # read by DDPM's power-cosine only
        latent_channels=checkpoint.latent_shape[0],
    )

    out = config.out
    _check_resumable(out, record)  # on every rank, so a refusal stops them all
    dist.barrier()
    if rank == 0:
        write_json(out / CONFIG_FILE, record)
    # Sample i is always computed in batch i // B with exactly the indices [kB, (k+1)B), whatever
    # the number of processes, an interruption or --num-samples: a float kernel's result may depend
    # on a row's position and neighbours, so fixed batches are what make the PNGs byte-identical.
    # Every rank lists before anyone writes a sample, so all agree on what is left to do.
    size = config.batch_size
    pending = [k for k in range(math.ceil(config.num_samples / size))
               if any(not sample_path(out, i).is_file() for i in range(k * size, min((k + 1) * size, config.num_samples)))]
    dist.barrier()
    mine = pending[rank::world]
    sampler = SAMPLERS[config.sampler]
    if config.sampler in EDM_SAMPLERS:
        sampler = functools.partial(sampler, churn=replace(IMAGENET_CHURN, s_churn=config.churn) if config.churn
                                    else Churn())
    if config.sampler in ETA_SAMPLERS:
        sampler = functools.partial(sampler, eta=config.resolved_eta)
    if config.sampler in CLIP_SAMPLERS:
        sampler = functools.partial(sampler, clip_x0=clip_x0)
    precision = sampling_mode(config.precision)
    set_tf32(precision)

    bar = tqdm(total=len(pending) * size, unit="img", disable=not (config.progress and rank == 0), desc="sampling")
    start = time.perf_counter()
    written = 0
    for k in mine:
        indices = list(range(k * size, (k + 1) * size))  # the last batch runs past N: those are not written
        generators = noise_generators(config.seed, indices)
        noise = initial_noise(generators, checkpoint.latent_shape).to(device)
        labels = torch.tensor(class_labels(classes, config.seed, indices, checkpoint.num_classes), device=device)
        with autocast(precision, device):
            latents = sampler(
                denoiser, noise, labels, diffusion=checkpoint.diffusion, timesteps=timesteps,
                step_noise=per_sample_noise(generators),
            )
        with torch.no_grad():  # the whole batch, for the same reason: decoding is a float kernel too
            images = to_uint8(vae.decode(latents.float()))
        keep = [j for j, i in enumerate(indices) if i < config.num_samples and not sample_path(out, i).is_file()]
        for j in keep:
            write_png(sample_path(out, indices[j]), images[j])
        written += len(keep)
        # Rank 0's bar counts every rank's work, assuming they keep pace.
        bar.update(min(size * world, bar.total - bar.n))
    seconds = time.perf_counter() - start
    bar.close()
    generated = int(dist.all_reduce_sum(written))
    dist.barrier()
    if rank == 0:
        _write_summaries(out, config, checkpoint, classes)
        record["images_per_second"] = round(generated / seconds, 3) if generated and seconds > 0 else None
        write_json(out / CONFIG_FILE, record)
    dist.barrier()
    return SampleResult(out=out, num_samples=config.num_samples, generated=generated, seconds=seconds)


def _write_summaries(out: Path, config: SampleConfig, checkpoint: Checkpoint, classes: Any) -> None:
    indices = list(range(config.num_samples))
    labels = class_labels(classes, config.seed, indices, checkpoint.num_classes)
    paths = [sample_path(out, i) for i in indices]
    write_npz(out / "samples.npz", paths, labels)
    names = checkpoint.class_names
    shown, columns = indices[:GRID_SIZE], 8
    if classes == "balanced" and config.num_samples >= 2 * checkpoint.num_classes and checkpoint.num_classes <= 16:
        # One row per class, so a reader compares what each class asked for at a glance.
        columns = min(8, config.num_samples // checkpoint.num_classes)
        shown = sorted(indices[: columns * checkpoint.num_classes], key=lambda i: (labels[i], i))
    captions = [names[labels[i]] if names and labels[i] < len(names) else str(labels[i]) for i in shown]
    write_grid(out / "grid.png", [read_png(paths[i]) for i in shown], captions, columns=columns)

