"""Distribution metrics on image features, in numpy (no scipy in the core install).

- Frechet distance (FID when the features are pytorch-fid's Inception pool features):
  ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)). The trace of the matrix square root
  is computed from eigenvalues: (S1 S2)^(1/2) is similar to S1^(1/2) S2 S1^(1/2), which is
  symmetric positive semi-definite, so tr = sum of sqrt of its eigenvalues (eigh, stable).
- KID (Binkowski et al. 2018): unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3,
  averaged over random subsets, with the std over subsets.
- Precision and recall (Kynkaanniemi et al. 2019): the k-NN radius of every real feature
  bounds a ball; precision = share of synthetic features inside some real ball, recall =
  share of real features inside some synthetic ball (balls from the synthetic set).
- Mann-Whitney U with its normal approximation (tie-corrected), for the data-copying test.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Frechet distance between N(mu1, s1) and N(mu2, s2)."""
    r1 = _sqrt_psd(np.atleast_2d(s1))
    m = r1 @ np.atleast_2d(s2) @ r1
    tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def kid(real: np.ndarray, fake: np.ndarray, *, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 over `subsets` random subsets of both sets."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        raise ValueError("KID needs at least 2 images in each set")
    d = real.shape[1]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(subsets):
        x = real[rng.choice(len(real), m, replace=False)]
        y = fake[rng.choice(len(fake), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        off = ~np.eye(m, dtype=bool)
        vals.append(kxx[off].mean() + kyy[off].mean() - 2 * kxy.mean())
    return float(np.mean(vals)), float(np.std(vals))


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of a and the rows of b."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.clip(d2, 0, None))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> dict[str, Any]:
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} images in each set")

    def radii(f: np.ndarray) -> np.ndarray:
        return np.sort(pairwise_distances(f, f), axis=1)[:, k]           # column 0 is the point itself

    def coverage(points: np.ndarray, centres: np.ndarray, r: np.ndarray) -> float:
        return float((pairwise_distances(points, centres) <= r[None, :]).any(axis=1).mean())

    return {"precision": coverage(fake, real, radii(real)), "recall": coverage(real, fake, radii(fake)), "k": k}


def ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, ties given the mean of the ranks they span (as scipy's rankdata)."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    first = np.r_[True, xs[1:] != xs[:-1]]                # start of each run of equal values
    run = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(x)]                      # one past each run's end
    out = np.empty(len(x), np.float64)
    out[order] = ((starts + 1 + ends) / 2.0)[run]         # mean of ranks starts+1 .. ends
    return out


def mann_whitney(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(U, Z) of the Mann-Whitney test of sample a against sample b: U counts the pairs with
    a > b (ties 1/2), Z = (U - mn/2) / sd(U) under H0 by the normal approximation with the tie
    correction, no continuity correction. Z < 0: a tends to be smaller than b."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    m, n = len(a), len(b)
    if m == 0 or n == 0:
        raise ValueError("the Mann-Whitney test needs at least one value in each sample")
    pooled = np.concatenate([a, b])
    u = float(ranks(pooled)[:m].sum() - m * (m + 1) / 2)
    _, t = np.unique(pooled, return_counts=True)
    big = m + n
    var = m * n / 12.0 * ((big + 1) - float((t ** 3 - t).sum()) / (big * (big - 1))) if big > 1 else 0.0
    return u, (float((u - m * n / 2.0) / np.sqrt(var)) if var > 0 else 0.0)


def histogram_distance(a: np.ndarray, b: np.ndarray, bins: int = 256) -> dict[str, float]:
    """Pixel intensity histograms (values in [0, 1]) of two image sets: total variation distance
    (half the L1 difference of the normalised histograms) and the 1-Wasserstein distance."""
    ha = np.histogram(a, bins=bins, range=(0.0, 1.0))[0].astype(np.float64)
    hb = np.histogram(b, bins=bins, range=(0.0, 1.0))[0].astype(np.float64)
    ha, hb = ha / ha.sum(), hb / hb.sum()
    return {"total_variation": float(0.5 * np.abs(ha - hb).sum()),
            "wasserstein1": float(np.abs(np.cumsum(ha) - np.cumsum(hb)).sum() / bins)}
