"""The optimizer the trainer and its benchmark share: fused AdamW, or Adan as MDTv2 trains with it.

Adan is timm's implementation. The official MDTv2 recipe uses sail-sg/Adan with max_grad_norm=1, which
timm's Adan lacks: the trainer gets the same step by clipping the global gradient norm to 1 before the
optimizer runs (DeepSpeed's gradient_clipping); tests/test_optimizer.py checks this against the official
optimizer step for step.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from mdt.errors import UserError

OPTIMIZERS = ("adamw", "adan")
_NUM_BETAS = {"adamw": 2, "adan": 3}


def adamw(params: Iterable[torch.nn.Parameter], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
          weight_decay: float = 0.0, eps: float = 1e-8) -> torch.optim.AdamW:
    # fused=True on every device (CPU kernels since torch 2.4): one pass over DeepSpeed's flat fp32
    # partition instead of a chain of whole-partition temporaries (sqrt, div, ...). On a 2-core CPU
    # this halved the optimizer step of DiT-S/2 (0.16 s -> 0.09 s).
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)


def adan(params: Iterable[torch.nn.Parameter], *, lr: float,
         betas: tuple[float, float, float] = (0.98, 0.92, 0.99), weight_decay: float = 0.0,
         eps: float = 1e-8) -> torch.optim.Optimizer:
    from timm.optim import Adan

    # no_prox=False is sail-sg/Adan's default (and MDTv2's): weight decay as a proximal step, p / (1 + lr*wd),
    # after the update. foreach is left to timm (CPU: per tensor, CUDA: multi-tensor); both compute the same.
    return Adan(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, no_prox=False)


@dataclass
class OptimizerConfig:
    """Which optimizer and its hyper-parameters (the lr comes from the schedule settings)."""

    name: str = "adamw"
    betas: tuple[float, ...] = (0.9, 0.999)  # adan: three betas, MDTv2 uses (0.98, 0.92, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def validate(self) -> None:
        if self.name not in OPTIMIZERS:
            raise UserError(f"optimizer.name is {self.name!r}; use one of {', '.join(OPTIMIZERS)}")
        wanted = _NUM_BETAS[self.name]
        if len(self.betas) != wanted:
            raise UserError(f"optimizer.betas has {len(self.betas)} values but {self.name} takes {wanted}; "
                            f"give {wanted} betas, such as {_example_betas(self.name)}")
        for beta in self.betas:
            if not 0.0 <= beta < 1.0:
                raise UserError(f"optimizer.betas contains {beta}; every beta must be in [0, 1)")
        if not self.eps > 0.0:
            raise UserError(f"optimizer.eps is {self.eps}; it must be greater than 0, such as 1e-8")
        if not self.weight_decay >= 0.0:
            raise UserError(f"optimizer.weight_decay is {self.weight_decay}; it must be 0 or greater")


def _example_betas(name: str) -> str:
    return "[0.98, 0.92, 0.99]" if name == "adan" else "[0.9, 0.999]"


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    """The configured optimizer over `params`; gradient clipping is the engine's job, not the optimizer's."""
    cfg.validate()
    betas = tuple(float(b) for b in cfg.betas)
    if cfg.name == "adan":
        return adan(params, lr=lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)  # type: ignore[arg-type]
    return adamw(params, lr=lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)  # type: ignore[arg-type]
