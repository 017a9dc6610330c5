"""Is a synthetic radiograph a copy of a training patient? Nearest neighbours in pixel space.

Every image is brought to SIZE x SIZE and standardised (zero mean, unit norm), so the dot
product of two is their normalised cross-correlation (NCC, 1 = identical up to brightness and
contrast) and distance = 1 - NCC. Training images are compared mirrored too (a left-right
flip is still a copy). The threshold for "copy" comes from the training set itself: the
1st percentile of each training image's distance to its nearest *other* training image
(its own mirror excluded). A synthetic image closer than that to some training image is
closer than 99% of real distinct radiographs are to each other: a likely copy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

SIZE = 64
PERCENTILE = 1.0
NEAR_DUPLICATE_NCC = 0.95


def standardise(images: np.ndarray, size: int = SIZE) -> np.ndarray:
    """(N, H, W) in [0, 1] -> (N, size*size) zero-mean unit-norm float32 rows."""
    from ..inputs.imageio import resize_center_crop
    small = np.stack([resize_center_crop(im, size) if im.shape != (size, size) else im for im in images])
    flat = small.reshape(len(small), -1).astype(np.float64)
    flat -= flat.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(flat, axis=1, keepdims=True)
    return (flat / np.maximum(norm, 1e-12)).astype(np.float32)


@dataclass
class Audit:
    nearest: np.ndarray            # (S,) index of each synthetic image's nearest training image
    mirrored: np.ndarray           # (S,) bool: the match was against the mirrored training image
    distance: np.ndarray           # (S,) 1 - NCC to it
    threshold: float               # PERCENTILE-th percentile of training nearest-other distances
    train_nn: np.ndarray           # (T,) each training image's distance to its nearest other one
    duplicates: list[tuple[int, int, float]]   # training pairs with NCC >= NEAR_DUPLICATE_NCC
    keys: np.ndarray               # (2T, D) training_keys(train): reused by the data-copying test

    @property
    def copies(self) -> np.ndarray:
        return np.flatnonzero(self.distance < self.threshold)

    @property
    def copy_share(self) -> float:
        return float(len(self.copies) / max(len(self.distance), 1))


def _best(queries: np.ndarray, keys: np.ndarray, chunk: int,
          progress: Callable[[int], object] | None) -> tuple[np.ndarray, np.ndarray]:
    """For each query row: (index of the key with the highest dot product, that product)."""
    idx = np.empty(len(queries), np.int64)
    val = np.empty(len(queries), np.float32)
    for a in range(0, len(queries), chunk):
        sims = queries[a:a + chunk] @ keys.T
        idx[a:a + chunk] = sims.argmax(axis=1)
        val[a:a + chunk] = sims.max(axis=1)
        if progress:
            progress(len(sims))
    return idx, val


def training_keys(train: np.ndarray) -> np.ndarray:
    """(2T, D): the standardised training images, then their mirrors (a flip is still a copy)."""
    return np.concatenate([standardise(train), standardise(train[:, :, ::-1])])


def nearest(rows: np.ndarray, keys: np.ndarray, *, chunk: int = 512,
            progress: Callable[[int], object] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each standardised row's nearest key: (its index in keys, the distance 1 - NCC)."""
    best, val = _best(rows, keys, chunk, progress)
    return best, 1.0 - val


def audit(train: np.ndarray, synth: np.ndarray, *, chunk: int = 512,
          progress: Callable[[int], object] | None = None) -> Audit:     # result ignored (tqdm's update)
    """train, synth: (N, H, W) images in [0, 1] (any H, W: they are brought to SIZE)."""
    keys = training_keys(train)                                      # (2T, D): originals, then mirrors
    n = len(train)
    t = keys[:n]
    # training vs training: exclude each image and its own mirror
    sims = t @ keys.T
    sims[np.arange(n), np.arange(n)] = -np.inf
    sims[np.arange(n), np.arange(n) + n] = -np.inf
    train_nn = 1.0 - sims.max(axis=1)
    both = np.maximum(sims[:, :n], sims[:, n:])
    dup = [(int(i), int(j), float(both[i, j])) for i, j in zip(*np.nonzero(np.triu(both, 1) >= NEAR_DUPLICATE_NCC))]
    best, dist = nearest(standardise(synth), keys, chunk=chunk, progress=progress)
    return Audit(nearest=best % n, mirrored=best >= n, distance=dist,
                 threshold=float(np.percentile(train_nn, PERCENTILE)), train_nn=train_nn,
                 duplicates=sorted(dup, key=lambda d: -d[2]), keys=keys)


def feature_audit(train: np.ndarray, train_mirrored: np.ndarray, synth: np.ndarray) -> dict:
    """The same test in feature space (Euclidean distance between Inception features): each
    synthetic image's nearest training image (mirrors included) against the PERCENTILE-th
    percentile of distinct training images' nearest-other distances."""
    from .metrics import pairwise_distances
    n = len(train)
    keys = np.concatenate([train, train_mirrored])                   # (2T, F)
    tt = pairwise_distances(train, keys)
    tt[np.arange(n), np.arange(n)] = np.inf                           # itself and its own mirror
    tt[np.arange(n), np.arange(n) + n] = np.inf
    threshold = float(np.percentile(tt.min(axis=1), PERCENTILE))
    st = pairwise_distances(synth, keys)
    best = st.argmin(axis=1)
    dist = st[np.arange(len(synth)), best]
    copies = np.flatnonzero(dist < threshold)
    return {"threshold_distance": threshold, "copies": [int(i) for i in copies],
            "nearest": [int(b % n) for b in best], "copy_share": float(len(copies) / max(len(synth), 1))}
