"""Feature statistics and the metrics computed from them: FID, sFID, KID and the Inception Score.

A statistics file is an npz without pickle: `mu` (D,), `sigma` (D, D), optionally `feats` (N, D)
(pool features, for KID and precision/recall), `mu_s`/`sigma_s` (sFID's spatial statistics,
named as in ADM's reference batches) and `meta`, a JSON string saying how it was made.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mdt.errors import UserError
from mdt.fileio import atomic_path, check_npz


def _moments(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    feats64 = feats.astype(np.float64)
    return feats64.mean(axis=0), np.cov(feats64, rowvar=False)


@dataclass
class FeatureStats:
    mu: np.ndarray
    sigma: np.ndarray
    feats: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None

    @classmethod
    def from_features(cls, feats: np.ndarray, meta: dict[str, Any] | None = None,
                      spatial: np.ndarray | None = None) -> FeatureStats:
        mu, sigma = _moments(feats)
        mu_s, sigma_s = _moments(spatial) if spatial is not None else (None, None)
        return cls(mu, sigma, feats.astype(np.float32), dict(meta or {}), mu_s, sigma_s)

    def save(self, path: Path) -> None:
        arrays = {"mu": self.mu, "sigma": self.sigma, "meta": np.array(json.dumps(self.meta))}
        for name in ("feats", "mu_s", "sigma_s"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: Path, what: str = "--ref") -> FeatureStats:
        check_npz(path, what, "make it again with `mdt fid-ref`.")
        try:
            with np.load(path, allow_pickle=False) as data:
                if "mu" not in data or "sigma" not in data:
                    raise UserError(f"{what} {path} has no mu/sigma arrays; make one with `mdt fid-ref IMAGES --out "
                                    f"{path.name}`.")
                get = {name: data[name] if name in data else None for name in ("feats", "mu_s", "sigma_s")}
                meta = json.loads(str(data["meta"])) if "meta" in data else {}
                return cls(data["mu"], data["sigma"], get["feats"], meta, get["mu_s"], get["sigma_s"])
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise UserError(f"{what} {path} is not a readable statistics npz ({err}); make it again with "
                            "`mdt fid-ref`.") from None


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), for any pair of covariance matrices.

    tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), a
    symmetric positive semi-definite matrix with the same eigenvalues as S1 S2. Computed that way
    (two symmetric eigendecompositions, negative round-off clipped to 0) it is real and finite
    for singular and near-singular covariances, where scipy's sqrtm of S1 S2 (used by clean-fid
    and ADM's evaluator) can return complex or non-finite values; on well-conditioned matrices
    the two agree to round-off.
    """
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise UserError(f"the feature sizes differ ({mu1.shape[0]} vs {mu2.shape[0]}); compute both with the same "
                        "network.")
    for name, array in (("mean", mu1), ("covariance", sigma1), ("reference mean", mu2),
                        ("reference covariance", sigma2)):
        if not np.isfinite(array).all():
            raise UserError(f"the {name} of the features holds NaN or infinite values; check that the images "
                            "decode and recompute the statistics.")
    diff = mu1.astype(np.float64) - mu2
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(w.clip(min=0))) @ v.T
    inner = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2).clip(min=0)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(eig).sum())


def fid(a: FeatureStats, b: FeatureStats) -> float:
    """Frechet distance between the Gaussians fitted to two pool-feature sets."""
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def sfid(a: FeatureStats, b: FeatureStats) -> float | None:
    """The same on sFID's spatial features; None when either side lacks them."""
    if a.mu_s is None or b.mu_s is None or a.sigma_s is None or b.sigma_s is None:
        return None
    return frechet_distance(a.mu_s, a.sigma_s, b.mu_s, b.sigma_s)


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


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """ADM's Inception Score: exp(E_x KL(p(y|x) || p(y))) per split of `split_size`, averaged over splits.

    `logits` are pool features times the softmax weights without the bias, as ADM's evaluator
    computes them; the softmax is taken in float64 as log-probabilities (so a probability that
    underflows contributes 0 instead of ADM's 0 * log 0 = NaN).
    """
    logits = logits.astype(np.float64)
    logp = logits - logits.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    scores = []
    for lo in range(0, len(logp), split_size):
        part = logp[lo : lo + split_size]
        p = np.exp(part)
        log_marginal = np.log(p.mean(axis=0, keepdims=True))
        scores.append(np.exp((p * (part - log_marginal)).sum(axis=1).mean()))
    return float(np.mean(scores))
