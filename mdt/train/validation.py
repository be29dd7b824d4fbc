"""Validation during training: the objective's plain loss on held-out shards, the same for every run."""

from __future__ import annotations

import torch

from mdt.data.reader import iter_validation_batches
from mdt.errors import UserError
from mdt.train.engine import Engine
from mdt.train.objective import Objective
from mdt.train.seeding import mix_seed

VALIDATION_SEED = 20240601  # fixed: every run and model is validated on the same noise


@torch.no_grad()
def validation_loss(engine: Engine, objective: Objective, data: str, shards: list[str], batch_size: int,
                    num_batches: int) -> dict[str, float]:
    """The objective's plain loss (no mask, no class dropout) at fixed timesteps or sigmas and fixed
    noise. Every rank evaluates the same batches (ZeRO-3 needs all ranks in each forward)."""
    totals: dict[str, float] = {}
    count = 0
    for index, batch in enumerate(iter_validation_batches(data, batch_size, VALIDATION_SEED, shards=shards)):
        if index == num_batches:
            break
        x0 = batch["latents"].to(engine.device)
        b = x0.shape[0]
        sample_ids = torch.arange(count, count + b)
        gen = torch.Generator().manual_seed(mix_seed(VALIDATION_SEED, index))
        terms = objective.validation_terms(engine, x0, batch["labels"].to(engine.device), sample_ids, gen)
        for name, value in terms.items():
            totals[name] = totals.get(name, 0.0) + value.sum().item()
        count += b
    if count == 0:
        raise UserError(f"the validation shards {shards} of {data} hold no samples")
    parts = {f"val_{k}": v / count for k, v in totals.items()}
    parts["val_loss"] = sum(parts.values())
    return parts
