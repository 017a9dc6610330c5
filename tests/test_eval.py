"""`cxr-runtime eval` and `cxr-export inception`: metrics against references, the memorization
audit on real radiographs, the ONNX extractor against pytorch-fid (random weights: the published
ones are not on these machines and are never faked), and the report's honesty about its weights."""
from __future__ import annotations

import json
import re
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import assert_user_error, bundled_patients
from cxr_ddpm.runtime.cli import main as runtime_cli
from cxr_ddpm.runtime.inputs.imageio import load_resized
from cxr_ddpm.runtime.evaluation.memorization import audit
from cxr_ddpm.runtime.evaluation.metrics import frechet_distance, gaussian_stats, kid, precision_recall

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "cxr-sample"


# ---------------------------------------------------------------- metrics

def test_frechet_distance_matches_scipy_sqrtm() -> None:
    from scipy import linalg
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 16)), rng.normal(1.0, 2.0, size=(300, 16)) @ rng.normal(size=(16, 16))
    (m1, s1), (m2, s2) = gaussian_stats(a), gaussian_stats(b)
    covmean = linalg.sqrtm(s1 @ s2).real
    want = float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(want, rel=1e-8)


def test_frechet_distance_closed_forms() -> None:
    assert frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3)) == pytest.approx(0, abs=1e-12)
    # diagonal covariances: sum of (mu difference)^2 + (sqrt(var1) - sqrt(var2))^2
    v1, v2, mu = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0]), np.array([1.0, 2.0, 3.0])
    want = float((mu ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum())
    assert frechet_distance(mu, np.diag(v1), np.zeros(3), np.diag(v2)) == pytest.approx(want, rel=1e-12)


def _kid_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, written out loop by loop."""
    m, d = len(x), x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3                                        # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_a_reference_on_fixed_features() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(12, 5)), rng.normal(0.5, 1.0, size=(12, 5))
    mean, std = kid(x, y, subsets=3, subset_size=12)                           # full sets: no sampling noise
    assert mean == pytest.approx(_kid_reference(x, y), rel=1e-10) and std == pytest.approx(0, abs=1e-12)


def test_precision_recall_extremes() -> None:
    rng = np.random.default_rng(2)
    real = rng.normal(size=(50, 4))
    assert precision_recall(real, real.copy()) == {"precision": 1.0, "recall": 1.0, "k": 3}
    far = precision_recall(real, real + 100.0)
    assert far["precision"] == 0.0 and far["recall"] == 0.0


# ---------------------------------------------------------------- memorization on real radiographs

def _split_by_patient() -> tuple[np.ndarray, np.ndarray]:
    """Training set: two thirds of the patients; 'others': images of the remaining patients."""
    patients = bundled_patients()
    cut = len(patients) * 2 // 3
    load = lambda gs: np.stack([load_resized(DATA / r["class"] / r["file"], 128) for g in gs for r in g])  # noqa: E731
    return load(patients[:cut]), load(patients[cut:])


def test_audit_flags_planted_copies_and_not_other_patients() -> None:
    train, others = _split_by_patient()
    noise = np.random.default_rng(0).normal(0, 0.03, train[2].shape)
    planted = np.stack([train[0], train[1][:, ::-1], np.clip(train[2] + noise, 0, 1)])   # exact, mirrored, noised
    a = audit(train, np.concatenate([planted, others]))
    assert list(a.copies) == [0, 1, 2]
    assert list(a.nearest[:3]) == [0, 1, 2] and list(a.mirrored[:3]) == [False, True, False]
    assert a.distance[3:].min() > a.threshold                                # other patients: none flagged


# ---------------------------------------------------------------- the ONNX extractor vs pytorch-fid

def _random_fid_weights(path: Path) -> Path:
    """pytorch-fid's FID Inception with random weights: its constructor would download the
    published ones, so its load_state_dict is skipped and the fresh random state is kept."""
    import pytorch_fid.inception as pfi
    captured: dict = {}
    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(torch.nn.Module, "load_state_dict",
                              lambda self, sd, strict=True: captured.update(self.state_dict())):
        pfi.fid_inception_v3()
    torch.save(captured, path)
    return path


@pytest.fixture(scope="module")
def random_extractor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cxr_ddpm.export.inception import export_inception
    d = tmp_path_factory.mktemp("inception")
    export_inception(_random_fid_weights(d / "random.pth"), d / "inception.onnx")
    return d / "inception.onnx"


def test_onnx_extractor_matches_pytorch_fid(random_extractor: Path) -> None:
    import onnxruntime as ort
    import pytorch_fid.inception as pfi
    state = torch.load(random_extractor.parent / "random.pth", weights_only=True)
    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: state):
        ref = pfi.InceptionV3([3]).eval()
    x = np.random.default_rng(3).random((2, 3, 96, 96), dtype=np.float32)           # a size not exported at
    with torch.inference_mode():
        want = ref(torch.from_numpy(x))[0].flatten(1).numpy()
    got = ort.InferenceSession(str(random_extractor), providers=["CPUExecutionProvider"]).run(
        ["features"], {"images": x})[0]
    assert got.shape == (2, 2048) and np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_random_weights_report_says_so_and_prints_no_fid(random_extractor: Path, tmp_path: Path) -> None:
    synth = tmp_path / "synth" / "Normal"                                   # a folder of images
    synth.mkdir(parents=True)
    for f in sorted((DATA / "Normal").glob("*.jpg"))[:6]:
        (synth / f.name).write_bytes(f.read_bytes())
    res = CliRunner().invoke(runtime_cli, ["eval", str(DATA), str(tmp_path / "synth"), "--size", "64",
                                           "--features", str(random_extractor), "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "ev" / "eval.md").read_text()
    assert md.splitlines()[0].startswith("WARNING: features from Inception weights that are not pytorch-fid's")
    assert not re.search(r"FID\W*[:=]?\s*[0-9]", md + res.output)             # no number labelled FID
    rep = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert rep["features"]["published_weights"] is False and rep["memorization"]["copy_share"] == 1.0
    assert rep["memorization"]["feature_space"]["copy_share"] == 1.0        # real images: copies in features too
    for png in ("closest_pairs.png", "histograms.png"):
        assert (tmp_path / "ev" / png).read_bytes()[:4] == b"\x89PNG"
    res = CliRunner().invoke(runtime_cli, ["eval", str(DATA), str(tmp_path / "synth"), "--size", "64",
                                           "--out", str(tmp_path / "ev2"), "--fail-on-copies"])
    assert res.exit_code == 3 and "look like copies of training images" in res.stderr


def test_eval_without_features_and_bad_inputs(tmp_path: Path) -> None:
    res = CliRunner().invoke(runtime_cli, ["eval", str(DATA), str(tmp_path / "nope")])
    assert_user_error(res, "SYNTH_DIR not found")
    (tmp_path / "empty").mkdir()
    assert_user_error(CliRunner().invoke(runtime_cli, ["eval", str(DATA), str(tmp_path / "empty")]),
                      "no images found")
    (tmp_path / "s" / "A").mkdir(parents=True)
    (tmp_path / "s" / "A" / "x.png").write_bytes(b"not a png")
    assert_user_error(CliRunner().invoke(runtime_cli, ["eval", str(DATA), str(tmp_path / "s")]),
                      "x.png: cannot read synthetic image", progress=True)
    fake = tmp_path / "f.onnx"
    fake.write_bytes(b"junk")
    assert_user_error(CliRunner().invoke(runtime_cli, ["eval", str(DATA), str(tmp_path / "s"), "--features",
                                                       str(fake)]), "not a loadable ONNX model")


def test_feature_audit_flags_copies_and_mirrors_only() -> None:
    from cxr_ddpm.runtime.evaluation.memorization import feature_audit
    rng = np.random.default_rng(4)
    train, mirrored = rng.normal(size=(30, 8)), rng.normal(size=(30, 8))
    synth = np.stack([train[3], mirrored[7] + 1e-6, rng.normal(size=8) * 5])
    a = feature_audit(train, mirrored, synth)
    assert a["copies"] == [0, 1] and a["nearest"][:2] == [3, 7]


# ---------------------------------------------------------------- issue 19: records, report folders, --out

def _plain_folder(dst: Path, n: int = 6) -> Path:
    """A folder of loose images (no samples.json, no class folders)."""
    dst.mkdir(parents=True)
    for f in sorted((DATA / "Normal").glob("*.jpg"))[:n]:
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_eval_truncated_samples_json_is_one_line(tmp_path: Path) -> None:
    synth = _plain_folder(tmp_path / "s")
    (synth / "samples.json").write_text('{"image_size": 64, "images": [{"file": "a.png", "cla')
    res = CliRunner().invoke(runtime_cli, ["eval", str(DATA), str(synth)])
    assert_user_error(res, f"{synth / 'samples.json'}: not a readable sample record", "JSONDecodeError")
    (synth / "samples.json").write_text('{"images": [{"file": "a.png"}]}')          # no image_size
    assert_user_error(CliRunner().invoke(runtime_cli, ["eval", str(DATA), str(synth)]),
                      "samples.json: not a readable sample record", "image_size")


def test_eval_never_reads_a_report_folder_as_input(tmp_path: Path) -> None:
    synth = _plain_folder(tmp_path / "s")
    for extra in ([], [], ["--out", str(tmp_path / "elsewhere")]):   # rerun; then s/eval/ stays, unused
        res = CliRunner().invoke(runtime_cli, ["eval", str(DATA), str(synth), "--size", "64", *extra])
        assert res.exit_code == 0, res.output
        rep = json.loads(((tmp_path / "elsewhere") if extra else synth / "eval").joinpath("eval.json").read_text())
        assert rep["counts"]["synthetic"] == {"(unlabelled)": 6}
    nested = tmp_path / "c"                                         # --out inside a class folder
    _plain_folder(nested / "Normal")
    for _ in range(2):
        res = CliRunner().invoke(runtime_cli, ["eval", str(DATA), str(nested), "--size", "64",
                                               "--out", str(nested / "Normal" / "report")])
        assert res.exit_code == 0, res.output
        rep = json.loads((nested / "Normal" / "report" / "eval.json").read_text())
        assert rep["counts"]["synthetic"] == {"(unlabelled)": 6}


def test_eval_failure_leaves_no_out_folder(tmp_path: Path) -> None:
    (tmp_path / "s" / "A").mkdir(parents=True)
    (tmp_path / "s" / "A" / "x.png").write_bytes(b"not a png")
    for extra in (["--out", str(tmp_path / "new" / "ev")], []):
        res = CliRunner().invoke(runtime_cli, ["eval", str(DATA), str(tmp_path / "s"), *extra])
        assert_user_error(res, "x.png: cannot read synthetic image", progress=True)
    assert not (tmp_path / "new").exists() and not (tmp_path / "s" / "eval").exists()
    (tmp_path / "file").write_text("")
    assert_user_error(CliRunner().invoke(runtime_cli, ["eval", str(DATA), str(tmp_path / "s"), "--out",
                                                       str(tmp_path / "file")]), "is a file, not a folder")
