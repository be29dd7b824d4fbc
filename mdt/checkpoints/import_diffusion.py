"""The diffusion process an imported checkpoint was trained with, which `mdt import` writes as `diffusion.json`.

Weights do not say how they were trained: the formulation is a fact of the code base that made them.
DiT (`diffusion/__init__.py` create_diffusion) and MDT/MDTv2 (their copy of it): DDPM, 1000 linear
betas 1e-4..0.02, eps prediction, learned sigma when the final layer outputs 2C channels.
MaskDiT (Anima-Lab/MaskDiT `models/maskdit.py` EDMPrecond, `train_utils/loss.py` EDMLoss,
`sample.py` edm_sampler): EDM with sigma_data 0.5, training ln(sigma) ~ N(-1.2, 1.2^2), sampling
sigmas from 80 down to 0.002 spaced with rho 7. MaskDM (`gaussian_ddpm.py`): DDPM on cosine betas,
or on whatever betas its checkpoint stores. A diffusers DiT: DDPM with the settings of the
pipeline's `scheduler/scheduler_config.json`, DiT's when there is none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mdt.diffusion.edm import EDMConfig
from mdt.diffusion.process import DiffusionConfig, diffusion_from_dict
from mdt.diffusion.schedule import ScheduleConfig, make_betas
from mdt.errors import UserError
from mdt.fileio import read_json_object

_DIT_DDPM = {"formulation": "ddpm", "num_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4,
             "beta_end": 0.02, "prediction_type": "epsilon"}
# By official format (mdt.checkpoints.official.FORMATS); "uvit" is MaskDM.
OFFICIAL_DIFFUSION: dict[str, dict[str, Any]] = {
    "dit": _DIT_DDPM, "mdt": _DIT_DDPM, "mdtv2": _DIT_DDPM,
    "maskdit": {"formulation": "edm", "sigma_data": 0.5, "p_mean": -1.2, "p_std": 1.2, "sigma_min": 0.002,
                "sigma_max": 80.0, "rho": 7.0},
    "uvit": {"formulation": "ddpm", "num_timesteps": 1000, "beta_schedule": "cosine", "prediction_type": "epsilon"},
}
# diffusers' beta_schedule names -> mdt's; diffusers' squaredcos_cap_v2 is improved DDPM's cosine.
_DIFFUSERS_BETAS = {"linear": "linear", "squaredcos_cap_v2": "cosine"}
_NAMES = {"dit": "DiT", "mdt": "MDT", "mdtv2": "MDTv2", "maskdit": "MaskDiT", "uvit": "MaskDM"}


def imported_diffusion(fmt: str, learn_sigma: bool, recorded: dict[str, Any] | None = None) -> DiffusionConfig:
    """The process of an official checkpoint of format `fmt`, with what the checkpoint itself records."""
    fields = {**OFFICIAL_DIFFUSION[fmt], **(recorded or {}), "learn_sigma": learn_sigma}
    name = _NAMES[fmt]
    if fields["formulation"] == "edm" and learn_sigma:
        raise UserError(f"the {name} checkpoint's final layer predicts a variance (2x the input channels), but "
                        f"{name} is an EDM model, which predicts the denoised image only; it is not an official one")
    try:
        return diffusion_from_dict(fields)
    except ValueError as err:  # a recorded setting mdt's process does not have
        raise UserError(f"the {name} checkpoint's diffusion settings are not ones mdt can sample ({err})") from None


def schedule_of_betas(betas: np.ndarray, what: str) -> dict[str, Any]:
    """The ScheduleConfig fields that rebuild stored betas: mdt's cosine or DiT's linear schedule."""
    for name in ("cosine", "linear"):
        cfg = ScheduleConfig(num_timesteps=len(betas), beta_schedule=name, learn_sigma=False)
        if np.allclose(make_betas(cfg), betas, rtol=1e-5, atol=1e-7):
            return {"num_timesteps": len(betas), "beta_schedule": name}
    raise UserError(f"{what}'s {len(betas)} betas are neither the cosine nor the linear (1e-4..0.02) schedule mdt "
                    "builds (a shifted schedule?); mdt cannot sample it as trained")


def _read_scheduler_config(folder: Path) -> dict[str, Any] | None:
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    return read_json_object(path, "re-download the pipeline")


def diffusers_schedule(folder: Path) -> dict[str, Any]:
    """The ScheduleConfig fields of a DiTPipeline folder's scheduler; none (DiT's) without a scheduler."""
    config = _read_scheduler_config(folder)
    if config is None:
        return {}
    where = folder / "scheduler" / "scheduler_config.json"
    prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":  # DiT's; mdt's DDPM and DDIM samplers read the output as epsilon
        raise UserError(f"{where}: prediction_type {prediction!r} is not one mdt samples; a DiT predicts 'epsilon'")
    if config.get("rescale_betas_zero_snr"):
        raise UserError(f"{where}: rescale_betas_zero_snr changes the betas in a way mdt does not; "
                        "mdt cannot sample this pipeline as trained")
    if config.get("trained_betas") is not None:  # what `mdt export` writes
        return schedule_of_betas(np.asarray(config["trained_betas"], dtype=np.float64), str(where))
    name = config.get("beta_schedule", "linear")  # absent keys: diffusers' defaults
    if name not in _DIFFUSERS_BETAS:
        raise UserError(f"{where}: beta_schedule {name!r} is not one mdt builds; it has "
                        f"{' and '.join(map(repr, _DIFFUSERS_BETAS))}")
    out = {"num_timesteps": int(config.get("num_train_timesteps", 1000)), "beta_schedule": _DIFFUSERS_BETAS[name]}
    if name == "linear":
        out.update(beta_start=float(config.get("beta_start", 1e-4)), beta_end=float(config.get("beta_end", 0.02)))
    return out


def describe(diffusion: DiffusionConfig) -> str:
    """One phrase for the import's message: the formulation and its main setting."""
    if isinstance(diffusion, EDMConfig):
        return f"EDM, sigma_data {diffusion.sigma_data}"
    return f"DDPM, {diffusion.num_timesteps} {diffusion.beta_schedule} betas"
