"""Copying that the audit's threshold does not see: the three-sample data-copying test of Meehan,
Chaudhuri & Dasgupta ("A Non-Parametric Test to Detect Data-Copying in Generative Models",
AISTATS 2020).

Three samples: the training images T, the synthetic images Q (m of them) and held-out real images
P (n, patients the model was not trained on). Each image's distance to T is its distance to the
nearest training image, exactly as the memorization audit measures it (1 - NCC at
memorization.SIZE px, training images also mirrored). A model that generalises makes images that
are, in distribution, as far from T as unseen patients are; one that copies makes them closer.

- Z_U(Q, P; T): the Mann-Whitney U of the synthetic distances against the held-out ones (U counts
  the pairs with the synthetic one farther), Z-scored under H0 (normal approximation, ties
  corrected): Z < 0 means the synthetic images are closer to T than held-out ones are.
- Cells (their C_T statistic): the space is cut into k cells by k-means on the training images;
  in each cell pi, Z_U(pi) compares the distances, to the training images of that cell, of the
  synthetic and held-out images in it. Cells with fewer than MIN_CELL synthetic images are left
  out (the paper's tau, "underrepresented"), and
      C_T = sum_pi P_n(pi) Z_U(pi) / sum_pi P_n(pi)     (P_n(pi): the share of held-out images in pi).
  k is the largest (<= MAX_CELLS) whose cells all hold MIN_CELL held-out images; with fewer than
  2 * MIN_CELL held-out images there is one cell and C_T = Z_U. Cells are made in a mirror-
  invariant space (the mean of an image and its mirror, at CELL_SIZE px), so a mirrored copy
  falls in its original's cell.
- Rule (the paper's): C_T < Z_COPYING with at least MIN_SYNTHETIC synthetic and MIN_HELDOUT
  held-out images means data-copying; with fewer images the test reports its Z and says that it
  cannot decide. C_T is an average: copying confined to one cell can be averaged away
  (Bhattacharjee et al., ICML 2023), so the sentence also names the cells whose own Z is below it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .memorization import SIZE, Audit, nearest, standardise, training_keys
from .metrics import mann_whitney

Z_COPYING = -3.0
MIN_SYNTHETIC = 64
MIN_HELDOUT = 20
MIN_CELL = 20                 # held-out images every cell needs; synthetic images a cell needs to count
MAX_CELLS = 10
CELL_SIZE = 16
NOT_RUN = ("the data-copying test (Meehan et al. 2020) needs --heldout DIR: real images of patients "
           "the model was not trained on")


def kmeans(x: np.ndarray, k: int, *, iters: int = 100, seed: int = 0) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding from a fixed seed: (k, D) centres."""
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        pick = rng.choice(len(x), p=d2 / d2.sum()) if d2.sum() > 0 else rng.integers(len(x))
        centres.append(x[pick])
        d2 = np.minimum(d2, ((x - x[pick]) ** 2).sum(1))
    c = np.stack(centres).astype(np.float64)
    labels = None
    for _ in range(iters):
        new = assign(x, c)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            if (labels == j).any():                    # an emptied cell keeps its centre
                c[j] = x[labels == j].mean(0)
    return c


def assign(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of each row's nearest centre (Euclidean)."""
    return ((centres * centres).sum(1)[None, :] - 2 * x @ centres.T).argmin(1)


def _cell_space(images: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Mean of image and mirror (a mirror lands in its original's cell), standardised at CELL_SIZE;
    in chunks: no full-size copy of a large synthetic set."""
    return np.concatenate([standardise((x + x[:, :, ::-1]) / 2, CELL_SIZE)
                           for x in (images[a:a + chunk] for a in range(0, len(images), chunk))])


def _cells(train: np.ndarray, held: np.ndarray, k_max: int, min_cell: int) -> np.ndarray | None:
    """Centres of the largest k in [2, k_max] whose cells all hold min_cell held-out images and a
    training image; None: one cell."""
    for k in range(k_max, 1, -1):
        c = kmeans(train, k)
        if np.bincount(assign(held, c), minlength=k).min() >= min_cell and \
                np.bincount(assign(train, c), minlength=k).min() >= 1:
            return c
    return None


@dataclass
class CopyingTest:
    z: float                          # C_T (one cell: the global Z_U)
    z_global: float                   # Z_U over all images, distances to the whole training set
    u_global: float
    synth_distance: np.ndarray        # (m,) each synthetic image's distance to its nearest training image
    heldout_distance: np.ndarray      # (n,) the same for each held-out image
    n_training: int
    cells: list[dict[str, Any]]       # per cell: training, heldout, synthetic counts, z, used
    min_synthetic: int = MIN_SYNTHETIC
    min_heldout: int = MIN_HELDOUT

    @property
    def enough(self) -> bool:
        return len(self.synth_distance) >= self.min_synthetic and len(self.heldout_distance) >= self.min_heldout

    @property
    def verdict(self) -> str:
        if not self.enough:
            return "not enough images"
        return "copying" if self.z < Z_COPYING else "no copying"

    @property
    def rule(self) -> str:
        return (f"data-copying when Z < {Z_COPYING:g} with at least {self.min_synthetic} synthetic and "
                f"{self.min_heldout} held-out images (Meehan et al. 2020)")

    def sentence(self) -> str:
        if abs(self.z) < 1.96:
            how = "about as close to the training patients as unseen patients are"
        else:
            how = ("closer to" if self.z < 0 else "farther from") + " the training patients than unseen patients are"
        m, n, k = len(self.synth_distance), len(self.heldout_distance), len(self.cells)
        verdict = {"copying": f"Z < {Z_COPYING:g}: data-copying",
                   "no copying": f"no data-copying by the rule Z < {Z_COPYING:g}",
                   "not enough images": f"not enough images to decide (the rule needs at least "
                                        f"{self.min_synthetic} synthetic and {self.min_heldout} held-out)"}
        low = [c for c in self.cells if c["used"] and c["z"] is not None and c["z"] < Z_COPYING] if k > 1 else []
        return (f"synthetic images are {how}: Z = {self.z:+.2f} ({m} synthetic, {n} held-out, "
                f"{k} cell{'s' if k > 1 else ''}); {verdict[self.verdict]}"
                + (f"; {len(low)} of {k} cells alone have Z < {Z_COPYING:g}" if low else ""))

    def to_json(self) -> dict[str, Any]:
        return {"test": "three-sample data-copying test, C_T of Meehan, Chaudhuri & Dasgupta (AISTATS 2020)",
                "z": self.z, "z_global": self.z_global, "u_global": self.u_global, "verdict": self.verdict,
                "sentence": self.sentence(), "rule": self.rule,
                "synthetic": len(self.synth_distance), "heldout": len(self.heldout_distance),
                "training": self.n_training,
                "distance": f"1 - NCC at {SIZE} px to the nearest training image, mirrors included, as in the audit",
                "median_distance": {"synthetic": float(np.median(self.synth_distance)),
                                    "heldout": float(np.median(self.heldout_distance))},
                "cell_rule": f"k-means on the training images (mean of image and mirror, {CELL_SIZE} px); the "
                             f"most cells (<= {MAX_CELLS}) that each hold >= {MIN_CELL} held-out images; a cell "
                             f"counts when it holds >= {MIN_CELL} synthetic images; Z = held-out-weighted mean "
                             "of the counted cells' Z",
                "cells": self.cells}


def data_copying(train: np.ndarray, synth: np.ndarray, heldout: np.ndarray, *, audit: Audit | None = None,
                 min_synthetic: int = MIN_SYNTHETIC, min_heldout: int = MIN_HELDOUT, min_cell: int = MIN_CELL,
                 progress: Callable[[int], object] | None = None) -> CopyingTest:
    """train, synth, heldout: (N, H, W) images in [0, 1] (any H, W: they are brought to SIZE).
    `audit` (of the same train and synth) lends its training keys and synthetic distances."""
    keys = audit.keys if audit is not None else training_keys(train)
    n_train = len(train)
    d_s = audit.distance if audit is not None else nearest(standardise(synth), keys)[1]
    d_h = nearest(standardise(heldout), keys)[1]
    u, z = mann_whitney(d_s, d_h)
    cells: list[dict[str, Any]] = [{"training": n_train, "heldout": len(d_h), "synthetic": len(d_s), "z": z,
                                    "used": True}]
    k_max = min(MAX_CELLS, len(heldout) // min_cell, len(synth) // min_cell)
    centres = None
    if k_max >= 2:
        ct, ch = _cell_space(train), _cell_space(heldout)
        centres = _cells(ct, ch, k_max, min_cell)
    c_t = z
    if centres is not None:
        lt, ls, lh = assign(ct, centres), assign(_cell_space(synth), centres), assign(ch, centres)
        cells, num, den = [], 0.0, 0.0
        for j in range(len(centres)):
            t_idx = np.flatnonzero(lt == j)
            cell_keys = keys[np.concatenate([t_idx, t_idx + n_train])]      # its training images and mirrors
            s_in, h_in = np.flatnonzero(ls == j), np.flatnonzero(lh == j)
            used = len(s_in) >= min_cell
            zj = None
            if len(s_in):
                ds_j = nearest(standardise(synth[s_in]), cell_keys, progress=progress)[1]
                dh_j = nearest(standardise(heldout[h_in]), cell_keys)[1]
                zj = mann_whitney(ds_j, dh_j)[1]
            cells.append({"training": len(t_idx), "heldout": len(h_in), "synthetic": len(s_in),
                          "z": zj, "used": used})
            if used and zj is not None:
                w = len(h_in) / len(heldout)                                 # P_n(pi)
                num, den = num + w * zj, den + w
        c_t = num / den            # k <= m / min_cell cells: at least one holds min_cell synthetic images
    return CopyingTest(z=float(c_t), z_global=float(z), u_global=u, synth_distance=np.asarray(d_s),
                       heldout_distance=np.asarray(d_h), n_training=n_train, cells=cells,
                       min_synthetic=min_synthetic, min_heldout=min_heldout)


def distance_plot(test: CopyingTest, w: int = 480, h: int = 260) -> np.ndarray:
    """Both distance histograms in one RGB picture: held-out images as grey bars, synthetic ones
    as an orange outline, each as a share of its own set, on the same bins."""
    from PIL import Image, ImageDraw
    s, r = test.synth_distance, test.heldout_distance
    top_d = float(max(s.max(), r.max(), 1e-6)) * 1.05
    bins = 30
    hs = np.histogram(s, bins=bins, range=(0, top_d))[0] / len(s)
    hr = np.histogram(r, bins=bins, range=(0, top_d))[0] / len(r)
    peak = max(hs.max(), hr.max())
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    x0, x1, y0, y1 = 40, w - 12, 34, h - 34                     # plot area: left, right, top, bottom
    bw = (x1 - x0) / bins
    for b in range(bins):
        left, right = x0 + b * bw, x0 + (b + 1) * bw
        if hr[b]:
            d.rectangle([left, y1 - (y1 - y0) * hr[b] / peak, right - 1, y1], fill=(170, 170, 170))
    pts = []
    for b in range(bins):
        y = y1 - (y1 - y0) * hs[b] / peak
        pts += [(x0 + b * bw, y), (x0 + (b + 1) * bw, y)]
    d.line([(x0, y1), *pts, (x1, y1)], fill=(230, 110, 0), width=2)
    d.line([(x0, y1), (x1, y1)], fill="black")
    d.line([(x0, y0), (x0, y1)], fill="black")
    for frac in (0.0, 0.5, 1.0):
        x = x0 + frac * (x1 - x0)
        d.text((x - 15 * frac - 8 * (frac == 0.5), y1 + 4), f"{frac * top_d:.3f}", fill="black")
    d.text((x0, h - 16), "distance to the nearest training image (1 - NCC)", fill="black")
    d.text((x0, 4), f"held-out (n={len(r)}): grey bars   synthetic (n={len(s)}): orange", fill="black")
    d.text((x0, 18), f"Z = {test.z:+.2f}: {test.verdict}", fill=(200, 0, 0) if test.verdict == "copying"
           else "black")
    return np.asarray(img)
