"""Make the golden fixture tests/fixtures/official/adan.safetensors with the OFFICIAL Adan optimizer.

Source: sail-sg/Adan 2c65beaf400775753b155da4082c3819fea689b9, file adan.py (git blob 9477c32d...; unchanged
since f0b1b81 of 2023-08-16, so it is the Adan that sail-sg/MDT main, 2024-04, trains with). Only that one file
is needed; it is imported from its path and must match the blob (the script checks)::

    mkdir -p /tmp/official/adan
    git --git-dir=Adan.git archive 2c65beaf400775753b155da4082c3819fea689b9 adan.py | tar -x -C /tmp/official/adan
    .venv/bin/python tools/make_adan_fixtures.py --adan /tmp/official/adan/adan.py

What it records: a tiny MLP (Linear(4, 8), Tanh, Linear(8, 3); every parameter randn * 0.5 after
torch.manual_seed(0)) trained for STEPS steps on seeded random batches with loss = scale * MSE, the per-step
scales chosen so that the global gradient norm is above 1 (clipped) in some steps and below it in others.
The optimizer is the official Adan as MDTv2's train_util.py builds it (betas and eps at their defaults
(0.98, 0.92, 0.99) and 1e-8, no_prox False, max_grad_norm=1), with fused=False because the fused CUDA kernel
does not run on CPU (its multi-tensor kernel does the same arithmetic as the default foreach path used here;
the script also checks that the per-tensor path agrees). Two runs: weight_decay 0 and 0.02, lr 1e-2.

Keys: initial.<param>, inputs.{x,y,scale}, wd<i>.step<k>.<param> (weights after step k = 1..STEPS of the run
with WEIGHT_DECAYS[i]), wd<i>.grad_norm (the global norm before clipping, per step). Metadata "fixture": JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
from pathlib import Path
from types import ModuleType

import torch

from fixture_utils import save_fixture

REPO = "sail-sg/Adan"
COMMIT = "2c65beaf400775753b155da4082c3819fea689b9"
ADAN_BLOB = "9477c32dc82f8ad4b2ee53a50354ab54502c9f0e"
SEED = 0
STEPS = 6
LR = 1e-2
BETAS = (0.98, 0.92, 0.99)
MAX_GRAD_NORM = 1.0
WEIGHT_DECAYS = (0.0, 0.02)
SCALES = (4.0, 0.05, 3.0, 0.1, 0.2, 6.0)  # loss multipliers: norms above and below MAX_GRAD_NORM
OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "official" / "adan.safetensors"


def load_official(path: Path) -> ModuleType:
    data = path.read_bytes()
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    if blob != ADAN_BLOB:
        raise SystemExit(f"{path} is git blob {blob}, expected {ADAN_BLOB} (adan.py at {REPO}@{COMMIT})")
    spec = importlib.util.spec_from_file_location("official_adan", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_model() -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def inputs() -> dict[str, torch.Tensor]:
    torch.manual_seed(SEED + 1)
    return {"x": torch.randn(STEPS, 5, 4), "y": torch.randn(STEPS, 5, 3), "scale": torch.tensor(SCALES)}


def run(official: ModuleType, initial: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
        weight_decay: float, foreach: bool) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    model = tiny_model()
    model.load_state_dict(initial)
    opt = official.Adan(model.parameters(), lr=LR, betas=BETAS, weight_decay=weight_decay,
                        max_grad_norm=MAX_GRAD_NORM, fused=False, foreach=foreach)
    weights, norms = [], []
    for k in range(STEPS):
        opt.zero_grad()
        loss = batch["scale"][k] * ((model(batch["x"][k]) - batch["y"][k]) ** 2).mean()
        loss.backward()
        norms.append(torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())))
        opt.step()
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return weights, torch.stack(norms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adan", type=Path, required=True, help="path to the official adan.py")
    official = load_official(parser.parse_args().adan)
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    initial = {n: p.detach().clone() for n, p in model.state_dict().items()}
    batch = inputs()
    tensors = {f"initial.{n}": v for n, v in initial.items()} | {f"inputs.{k}": v for k, v in batch.items()}
    for i, wd in enumerate(WEIGHT_DECAYS):
        weights, norms = run(official, initial, batch, wd, foreach=True)
        per_tensor, _ = run(official, initial, batch, wd, foreach=False)
        for a, b in zip(weights, per_tensor, strict=True):
            assert all(torch.allclose(a[n], b[n], rtol=1e-6, atol=0) for n in a), "official paths disagree"
        above = int((norms > MAX_GRAD_NORM).sum())
        assert 2 <= above <= STEPS - 2, f"grad norms {norms.tolist()} do not straddle {MAX_GRAD_NORM}"
        tensors[f"wd{i}.grad_norm"] = norms
        for k, step in enumerate(weights, start=1):
            tensors |= {f"wd{i}.step{k}.{n}": v for n, v in step.items()}
    meta = {"repo": REPO, "commit": COMMIT, "file": "adan.py", "blob": ADAN_BLOB, "seed": SEED, "steps": STEPS,
            "lr": LR, "betas": BETAS, "eps": 1e-8, "no_prox": False, "max_grad_norm": MAX_GRAD_NORM,
            "weight_decays": WEIGHT_DECAYS, "fused": False, "foreach": True, "torch": torch.__version__}
    save_fixture(OUT, tensors, meta)


if __name__ == "__main__":
    main()
