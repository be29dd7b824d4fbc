"""Improved precision and recall (Kynkaanniemi et al. 2019) as ADM's evaluator computes them.

Each set's manifold is the union of balls around its points, the radius of a point being the
distance to its k-th nearest neighbour in its own set (k = 3; the point itself is the 0th).
Precision: the fraction of samples inside the reference manifold. Recall: the fraction of
reference points inside the sample manifold. Distances are squared Euclidean on the pool
features, compared with the squared radii, in blocks (the result does not depend on their size;
ADM's ManifoldEstimator uses 10000 x 10000, here 2500 rows to bound the memory of a CPU run). ADM computes the distance blocks in float16 when they fit (float32 otherwise); here they
are float32, which moves only points whose distance ties a radius to within float16 round-off.
"""

from __future__ import annotations

import numpy as np

NEIGHBOURHOOD = 3
BLOCK = 2_500


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(Na, Nb) squared distances, as ADM's _batch_pairwise_distances: |a|^2 - 2 a.b + |b|^2, clipped at 0."""
    na = (a * a).sum(axis=1)[:, None]
    nb = (b * b).sum(axis=1)[None, :]
    return np.maximum(na - 2 * (a @ b.T) + nb, 0.0)


def manifold_radii(feats: np.ndarray, k: int = NEIGHBOURHOOD) -> np.ndarray:
    """(N,) squared distance of each point to its k-th nearest neighbour in `feats` (itself counted as 0th)."""
    feats = feats.astype(np.float32)
    radii = np.empty(len(feats), dtype=np.float32)
    for lo in range(0, len(feats), BLOCK):
        d = _squared_distances(feats[lo : lo + BLOCK], feats)
        radii[lo : lo + BLOCK] = np.partition(d, k, axis=1)[:, k]
    return radii


def precision_recall(ref: np.ndarray, samples: np.ndarray, k: int = NEIGHBOURHOOD) -> tuple[float, float]:
    """(precision, recall) of `samples` against `ref`; both sets need more than k points."""
    if len(ref) <= k or len(samples) <= k:
        raise ValueError(f"precision/recall needs more than {k} points in each set")
    ref, samples = ref.astype(np.float32), samples.astype(np.float32)
    ref_radii, sample_radii = manifold_radii(ref, k), manifold_radii(samples, k)
    sample_in = np.zeros(len(samples), dtype=bool)
    ref_in = np.zeros(len(ref), dtype=bool)
    for i in range(0, len(ref), BLOCK):
        for j in range(0, len(samples), BLOCK):
            d = _squared_distances(ref[i : i + BLOCK], samples[j : j + BLOCK])  # (ref block, sample block)
            sample_in[j : j + BLOCK] |= (d <= ref_radii[i : i + BLOCK, None]).any(axis=0)
            ref_in[i : i + BLOCK] |= (d <= sample_radii[None, j : j + BLOCK]).any(axis=1)
    return float(sample_in.mean()), float(ref_in.mean())
