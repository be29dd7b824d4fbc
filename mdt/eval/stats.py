"""Feature statistics and the distances between them: FID (Frechet) and KID (polynomial MMD).

A statistics file is an npz without pickle: `mu` (D,), `sigma` (D, D), optionally `feats` (N, D)
for KID, and `meta`, a JSON string saying how it was made. Files with only `mu` and `sigma`
(clean-fid's own reference statistics) are read too; KID is then not available.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cleanfid.fid import frechet_distance

from mdt.errors import UserError
from mdt.fileio import atomic_path


@dataclass
class FeatureStats:
    mu: np.ndarray
    sigma: np.ndarray
    feats: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_features(cls, feats: np.ndarray, meta: dict[str, Any] | None = None) -> FeatureStats:
        feats64 = feats.astype(np.float64)
        return cls(feats64.mean(axis=0), np.cov(feats64, rowvar=False), feats.astype(np.float32), dict(meta or {}))

    def save(self, path: Path) -> None:
        arrays = {"mu": self.mu, "sigma": self.sigma, "meta": np.array(json.dumps(self.meta))}
        if self.feats is not None:
            arrays["feats"] = self.feats
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: Path) -> FeatureStats:
        try:
            with np.load(path, allow_pickle=False) as data:
                if "mu" not in data or "sigma" not in data:
                    raise UserError(f"--ref {path} has no mu/sigma arrays; make one with `mdt fid-ref IMAGES --out {path.name}`.")
                feats = data["feats"] if "feats" in data else None
                meta = json.loads(str(data["meta"])) if "meta" in data else {}
                return cls(data["mu"], data["sigma"], feats, meta)
        except (OSError, ValueError) as err:
            raise UserError(f"--ref {path} is not a readable statistics npz ({err}); make one with `mdt fid-ref`.") from None


def fid(a: FeatureStats, b: FeatureStats) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets (clean-fid's implementation)."""
    if a.mu.shape != b.mu.shape:
        raise UserError(
            f"the feature sizes differ ({a.mu.shape[0]} vs {b.mu.shape[0]}); compute both with the same network."
        )
    return float(frechet_distance(a.mu, a.sigma, b.mu, b.sigma))


def kid(feats1: np.ndarray, feats2: np.ndarray, *, num_subsets: int = 100, max_subset_size: int = 1000,
        seed: int = 0) -> float:
    """Kernel Inception Distance: unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, averaged over subsets.

    The estimator clean-fid uses, with a seeded generator of its own instead of numpy's global one.
    """
    rng = np.random.default_rng(seed)
    d = feats1.shape[1]
    m = min(len(feats1), len(feats2), max_subset_size)
    total = 0.0
    for _ in range(num_subsets):
        x = feats2[rng.choice(len(feats2), m, replace=False)].astype(np.float64)
        y = feats1[rng.choice(len(feats1), m, replace=False)].astype(np.float64)
        kxx_kyy = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        total += (kxx_kyy.sum() - np.diag(kxx_kyy).sum()) / (m - 1) - kxy.sum() * 2 / m
    return float(total / num_subsets / m)
