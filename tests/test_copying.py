"""The three-sample data-copying test (Meehan, Chaudhuri & Dasgupta, AISTATS 2020) on real
radiographs split by patient: a generator that returns its training images with noise is caught
although the audit's threshold flags none of them; images of other patients are not; per-cell Z
against a by-hand computation; `cxr-runtime eval --heldout` and `--fail-on-copies`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import BUNDLED, assert_user_error, bundled_patients
from cxr_ddpm.runtime.cli import main as runtime_cli
from cxr_ddpm.runtime.evaluation.copying import MIN_HELDOUT, MIN_SYNTHETIC, data_copying
from cxr_ddpm.runtime.inputs.imageio import load_resized
from cxr_ddpm.runtime.evaluation.memorization import audit
from cxr_ddpm.runtime.evaluation.metrics import mann_whitney

Rows = list[list[dict[str, str]]]


def _load(groups: Rows, size: int = 128) -> np.ndarray:
    return np.stack([load_resized(BUNDLED / r["class"] / r["file"], size) for g in groups for r in g])


def _noisy_copies(train: np.ndarray, n: int = 64, sigma: float = 0.15, seed: int = 0) -> np.ndarray:
    """A "generator" that memorised its training set: training images again, with pixel noise."""
    rng = np.random.default_rng(seed)
    return np.clip(train[np.arange(n) % len(train)] + rng.normal(0, sigma, (n, *train.shape[1:])), 0, 1)


def test_mann_whitney_matches_scipy_with_ties() -> None:
    from scipy.stats import mannwhitneyu, norm
    rng = np.random.default_rng(0)
    for a, b in [(rng.normal(size=30), rng.normal(0.7, 1, size=20)),
                 (rng.integers(0, 5, 40).astype(float), rng.integers(0, 6, 25).astype(float))]:   # many ties
        u, z = mann_whitney(a, b)
        ref = mannwhitneyu(a, b, method="asymptotic", use_continuity=False)
        assert u == ref.statistic and z == pytest.approx(np.sign(z) * norm.isf(ref.pvalue / 2), rel=1e-9)
    assert mann_whitney(np.zeros(5), np.ones(7))[1] < 0 and mann_whitney([1.0, 1.0], [1.0])[1] == 0.0


def test_noisy_copies_are_caught_though_the_audit_flags_none() -> None:
    patients = bundled_patients()
    train, held = _load(patients[: len(patients) * 2 // 3]), _load(patients[len(patients) * 2 // 3:])
    synth = _noisy_copies(train)
    a = audit(train, synth)
    assert len(a.copies) == 0                                   # the threshold sees no copy ...
    t = data_copying(train, synth, held, audit=a)
    assert t.z < -3 and t.z == t.z_global and len(t.cells) == 1   # ... the test does (too few for cells)
    assert len(held) < MIN_HELDOUT and t.verdict == "not enough images"
    assert t.sentence().startswith("synthetic images are closer to the training patients than unseen "
                                   f"patients are: Z = {t.z:+.2f}") and "not enough images" in t.sentence()
    decided = data_copying(train, synth, held, audit=a, min_heldout=len(held))
    assert decided.verdict == "copying" and decided.z == t.z
    assert data_copying(train, synth[:MIN_SYNTHETIC - 1], held, min_heldout=len(held)).verdict == \
        "not enough images"
    same = data_copying(train, synth, held)                     # without the audit's distances: the same
    assert same.z == t.z and np.array_equal(same.synth_distance, a.distance)


@pytest.mark.parametrize("turn", [0, 1, 2])
def test_other_patients_are_not_copies(turn: int) -> None:
    """Three disjoint groups of patients take turns as training, held-out and 'synthetic' set."""
    patients = bundled_patients()
    groups = [patients[(i + turn) % 3::3] for i in range(3)]
    train, held, other = (_load(g) for g in groups)
    t = data_copying(train, other, held)
    assert abs(t.z) < 2, t.sentence()
    assert t.sentence().startswith("synthetic images are about as close to the training patients as unseen")


def test_cells_weigh_each_region_by_hand() -> None:
    """Two regions the cells must tell apart: radiographs and their negatives. The generator copies
    in the first (noisy copies) and makes other patients' negatives in the second."""
    patients = bundled_patients()
    a_train, a_held, a_other = (_load(patients[i::3]) for i in range(3))
    train, held = np.concatenate([a_train, 1 - a_train]), np.concatenate([a_held, 1 - a_held])
    synth = np.concatenate([_noisy_copies(a_train), 1 - a_other])
    t = data_copying(train, synth, held, min_cell=10)
    assert len(t.cells) == 2 and all(c["used"] for c in t.cells)
    z_by_hand, weights = [], []
    for region, (tr, ho, sy) in enumerate([(a_train, a_held, synth[:64]), (1 - a_train, 1 - a_held, 1 - a_other)]):
        cell = next(c for c in t.cells if c["synthetic"] == len(sy))        # each region is one cell
        assert (cell["training"], cell["heldout"]) == (len(tr), len(ho))
        z = mann_whitney(audit(tr, sy).distance, audit(tr, ho).distance)[1]  # distances to that cell's T
        assert cell["z"] == pytest.approx(z, abs=1e-9)
        z_by_hand.append(z)
        weights.append(len(ho) / len(held))
    assert z_by_hand[0] < -3 and abs(z_by_hand[1]) < 2                      # copying in one region only
    assert t.z == pytest.approx(np.dot(weights, z_by_hand) / sum(weights), abs=1e-9)
    assert t.sentence().endswith("; 1 of 2 cells alone have Z < -3")      # C_T averages it away: said


# ---------------------------------------------------------------- cxr-runtime eval --heldout

def _copy_rows(groups: Rows, dst: Path) -> Path:
    for r in (r for g in groups for r in g):
        (dst / r["class"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(BUNDLED / r["class"] / r["file"], dst / r["class"] / r["file"])
    return dst


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """train/ and heldout/ (the last patients, MIN_HELDOUT images or more), as class folders, and
    copies/: 64 noisy copies of the training images as 8-bit PNGs, the way `sample` writes them."""
    root = tmp_path_factory.mktemp("split")
    patients = bundled_patients()
    cut = len(patients)
    while sum(len(g) for g in patients[cut:]) < MIN_HELDOUT:
        cut -= 1
    train = _copy_rows(patients[:cut], root / "train")
    held = _copy_rows(patients[cut:], root / "heldout")
    (root / "copies").mkdir()
    for i, img in enumerate(_noisy_copies(_load(patients[:cut]))):
        Image.fromarray(np.rint(img * 255).astype(np.uint8)).save(root / "copies" / f"{i:05d}.png")
    return {"train": train, "heldout": held, "copies": root / "copies"}


def test_eval_heldout_reports_and_fails_on_copying(split: dict[str, Path], tmp_path: Path) -> None:
    args = ["eval", str(split["train"]), str(split["copies"]), "--heldout", str(split["heldout"])]
    res = CliRunner().invoke(runtime_cli, [*args, "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert "data copying: synthetic images are closer to the training patients than unseen patients are: Z = -" \
        in res.stdout and "Z < -3: data-copying" in res.stdout
    rep = json.loads((tmp_path / "ev" / "eval.json").read_text())
    c = rep["data_copying"]
    assert rep["memorization"]["copies"] == [] and c["verdict"] == "copying" and c["z"] < -3
    assert (c["synthetic"], c["heldout"]) == (64, sum(1 for _ in split["heldout"].rglob("*.jpg")))
    assert (tmp_path / "ev" / "distances.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Data-copying test" in (tmp_path / "ev" / "eval.md").read_text()
    res = CliRunner().invoke(runtime_cli, [*args, "--out", str(tmp_path / "ev2"), "--fail-on-copies"])
    assert res.exit_code == 3 and "copies its training patients (data-copying test Z = -" in res.stderr


def test_eval_without_heldout_says_the_test_needs_it(split: dict[str, Path], tmp_path: Path) -> None:
    res = CliRunner().invoke(runtime_cli, ["eval", str(split["train"]), str(split["copies"]), "--fail-on-copies",
                                           "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output                    # the audit alone flags none of these copies
    assert "data copying: the data-copying test (Meehan et al. 2020) needs --heldout DIR" in res.stdout
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["data_copying"]["verdict"] == "not run"
    assert not (tmp_path / "ev" / "distances.png").exists()


def test_eval_heldout_bad_folders(split: dict[str, Path], tmp_path: Path) -> None:
    base = ["eval", str(split["train"]), str(split["copies"]), "--out", str(tmp_path / "ev"), "--heldout"]
    assert_user_error(CliRunner().invoke(runtime_cli, [*base, str(tmp_path / "nope")]), "--heldout not found")
    assert_user_error(CliRunner().invoke(runtime_cli, [*base, str(split["train"])]), "is REAL_DIR")
    assert_user_error(CliRunner().invoke(runtime_cli, [*base, str(split["train"] / "Normal")]),
                      "also in REAL_DIR", progress=True)
    assert not (tmp_path / "ev").exists()
