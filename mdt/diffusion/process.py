"""The diffusion process of a run, DDPM (DiT, MDT) or EDM (MaskDiT), and the objective of a family.

`diffusion.json` names its formulation; one written before EDM existed (no `formulation`) is DDPM.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mdt.diffusion.edm import EDMConfig, EDMObjective
from mdt.diffusion.mdsm import MDSMObjective
from mdt.diffusion.objectives import DiffusionObjective, MDTObjective
from mdt.diffusion.schedule import NoiseSchedule, ScheduleConfig

DiffusionConfig = ScheduleConfig | EDMConfig
FORMULATIONS = {"ddpm": ScheduleConfig, "edm": EDMConfig}
# MaskDiT trains with EDM as its paper does; the others with DiT's DDPM.
DEFAULT_FORMULATION = {"dit": "ddpm", "mdt": "ddpm", "mdtv2": "ddpm", "maskdit": "edm", "uvit": "ddpm"}
# Settings a family's paper changes from the formulation's defaults: MaskDM trains on cosine betas.
FAMILY_DIFFUSION = {"uvit": {"beta_schedule": "cosine"}}


def diffusion_from_dict(data: dict[str, Any], *, family: str | None = None) -> DiffusionConfig:
    """A process from its JSON fields; the family's default formulation when none is named.

    Raises ValueError (with the unknown keys or formulation) for what this version cannot build.
    """
    formulation = data.get("formulation") or DEFAULT_FORMULATION.get(family or "", "ddpm")
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {sorted(FORMULATIONS)}, got {formulation!r}")
    cls = FORMULATIONS[formulation]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {formulation} setting(s) {unknown}; known: {sorted(known)}")
    defaults = FAMILY_DIFFUSION.get(family or "", {}) if formulation == "ddpm" else {}
    return cls(**{**defaults, **data, "formulation": formulation})


def make_objective(family: str, *, num_classes: int, grid_size: int, patch_size: int, learn_sigma: bool = True,
                   diffusion: DiffusionConfig | None = None, routes: int = 0,
                   **options: Any) -> DiffusionObjective | EDMObjective:
    """The objective of a model family under `diffusion` (default: the family's formulation), with the
    papers' defaults; `options` override them.

    DDPM: DiT plain; MDT mask ratio 0.3; MDTv2 ratio in [0.3, 0.5] with Min-SNR-5; the U-ViT MaskDM's
    MDSM (4x4-patch blocks, ratio 0.9; ratio 0 fine-tunes), no class dropout. EDM: MaskDiT mask
    ratio 0.5 with MAE weight 0.1; DiT unmasked (a baseline MaskDiT's paper compares with). Class
    dropout 0.1 for all. `routes`: the model's number of TREAD routes (DiT, MaskDiT), whose token
    choices the objective draws.
    """
    if diffusion is None:
        diffusion = diffusion_from_dict({"learn_sigma": learn_sigma}, family=family)
    if isinstance(diffusion, EDMConfig):
        if family not in ("dit", "maskdit"):
            raise ValueError(f"the {family} objective (a full and a masked pass) is defined for DDPM only; "
                             "use formulation ddpm")
        defaults = {"mask_ratio": 0.5, "mae_weight": 0.1} if family == "maskdit" else {}
        return EDMObjective(diffusion, num_classes=num_classes, grid_size=grid_size, patch_size=patch_size,
                            routes=routes, **{**defaults, **options})
    if family == "maskdit":
        raise ValueError("MaskDiT trains with EDM (its paper's formulation); use formulation edm")
    if family == "uvit":  # MaskDM: MDSM pre-training (block masks, 90%); mask_ratio 0 is its fine-tuning
        return MDSMObjective(NoiseSchedule(diffusion), num_classes=num_classes, grid_size=grid_size,
                             patch_size=patch_size, **options)
    schedule = NoiseSchedule(diffusion)
    common = {"num_classes": num_classes, "learn_sigma": learn_sigma}
    if family == "dit":
        return DiffusionObjective(schedule, **common, routes=routes, num_tokens=grid_size**2, **options)
    if family == "mdt":
        return MDTObjective(schedule, grid_size=grid_size, **{"mask_ratio": 0.3, **common, **options})
    if family == "mdtv2":
        defaults = {"mask_ratio": 0.3, "mask_ratio_span": 0.2, "min_snr_gamma": 5.0}
        return MDTObjective(schedule, grid_size=grid_size, **{**defaults, **common, **options})
    raise ValueError(f"no objective for model family {family!r}")
