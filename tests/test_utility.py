"""`cxr-train utility` (train on synthetic, test on real) on the bundled radiographs at 32 px,
split by the manifest's patient ids (every other patient of each class is a test patient)."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import BUNDLED, assert_user_error, bundled_patients
from cxr_ddpm.runtime.inputs.datasets import list_images
from cxr_ddpm.train.cli import main as train_cli

STEPS, BATCH = "40", "16"          # a few steps: enough to separate real from noise, seconds on CPU


@pytest.fixture(autouse=True)
def _one_thread():
    """Results are repeatable for a given torch build and thread count: the figures in the
    docstrings below were measured with one."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(train, test) class folders; no patient on both sides."""
    root = tmp_path_factory.mktemp("split")
    seen: dict[str, int] = {}
    for group in bundled_patients():
        cls = group[0]["class"]
        side = "test" if seen.get(cls, 0) % 2 else "train"
        seen[cls] = seen.get(cls, 0) + 1
        for row in group:
            (root / side / row["class"]).mkdir(parents=True, exist_ok=True)
            shutil.copy2(BUNDLED / row["class"] / row["file"], root / side / row["class"] / row["file"])
    return root / "train", root / "test"


def _noise_set(folder: Path, per_class: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for cls in ("COVID-19", "Normal"):
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(folder / cls / f"sample_{i:05d}.png")
    return folder


def _record(folder: Path, engine: Path | None, classes: bool = True) -> None:
    """samples.json as `cxr-runtime sample` writes it, the fields utility reads."""
    from cxr_ddpm.runtime.fsutil import file_sha256
    images = [{"index": i, "class": (p.parent.name if classes else None), "file": str(p.relative_to(folder))}
              for i, p in enumerate(sorted(folder.glob("*/*.png")))]
    rec = {"engine": str(engine) if engine else None, "engine_sha256": file_sha256(engine) if engine else None,
           "image_size": 32, "images": images, "complete": True}
    (folder / "samples.json").write_text(json.dumps(rec))


def _checkpoint(path: Path, cfg, fingerprint: str | None, root: str | None = None) -> Path:
    """A real .safetensors checkpoint (save_checkpoint) whose provenance names `fingerprint`."""
    import dataclasses

    import torch

    from cxr_ddpm.train.checkpoint import save_checkpoint
    if root is not None:
        cfg = cfg.replace(data=dataclasses.replace(cfg.data, root=root))
    sd = {"w": torch.zeros(1)}
    return save_checkpoint(path, cfg=cfg, step=1, class_names=["COVID-19", "Normal"], ema=sd, online=sd,
                           data_fingerprint=fingerprint)


def _run(*args: str) -> object:
    return CliRunner().invoke(train_cli, ["utility", *args])


# -----------------------------------------------------------------------------
# end to end

def test_noise_synthetic_set_is_useless_and_the_generator_data_warning(
        split: tuple[Path, Path], tmp_path: Path, tiny_cfg, capsys: pytest.CaptureFixture) -> None:
    """Pure noise as the "synthetic" set: the synthetic-only classifier is at chance on real test
    images, well below real only, averaged over 3 seeds. A seed draws the noise set AND the
    classifier: on 23 test images a noise-trained network's ranking is an arbitrary function of
    the images, and one fixed noise set biases it (measured, 1 thread: noise set 0 gave 0.23, 0.21,
    0.13, 0.41 over 4 classifier seeds; sets 1 and 2 gave 0.25-0.80), so the noise is redrawn too.
    The first run's record names a checkpoint trained on all 44 bundled images (train + test
    merged): it warns that REAL_TEST is in the generator's training data."""
    train, test = split
    real, noise, t0 = [], [], time.perf_counter()
    for seed in range(3):
        synth = _noise_set(tmp_path / f"noise{seed}", per_class=12, seed=seed)
        if seed == 0:
            ckpt = _checkpoint(tmp_path / "gen.safetensors", tiny_cfg, list_images(BUNDLED).fingerprint(),
                               root="/gone")
            _record(synth, ckpt)
        out = tmp_path / f"rep{seed}"
        res = _run("--train", str(train), "--test", str(test), "--synth", str(synth), "--out", str(out),
                   "--seed", str(seed), "--steps", STEPS, "--batch", BATCH, "--bootstrap", "200")
        assert res.exit_code == 0, res.output
        rep = json.loads((out / "utility.json").read_text())
        real.append(rep["regimes"]["real"]["macro_auroc"]["mean"])
        noise.append(rep["regimes"]["synth"]["macro_auroc"]["mean"])
        if seed == 0:
            assert "warning: REAL_TEST is part of the generator's training data" in res.stderr
            assert "merged" in res.stderr and rep["generator_data"]["verdict"] == "REAL_TEST is in it"
            assert set(rep["regimes"]) == {"real", "synth", "real+synth"} and rep["counts"]["test"] == [14, 9]
            for r in rep["regimes"].values():
                assert np.sum(r["confusion_summed_over_seeds"]) == 23
                lo, hi = r["macro_auroc"]["ci95"]
                assert 0.0 <= lo <= hi <= 1.0
            md = (out / "utility.md").read_text()
            assert "Patients must not overlap" in md and "no patient ids" in md.splitlines()[4]
            assert Image.open(out / "roc.png").size[0] > 400
            assert res.stdout.startswith(f"macro AUROC on {test}: real ")
        else:
            assert rep["generator_data"]["verdict"] == "unknown"          # no record: nothing to ask
    with capsys.disabled():
        print(f"\n[utility end to end, 3 runs x 3 regimes x {STEPS} steps of {BATCH} at 32 px: "
              f"{time.perf_counter() - t0:.1f} s; macro AUROC real {np.round(real, 3).tolist()}, "
              f"noise {np.round(noise, 3).tolist()}]")
    assert abs(np.mean(noise) - 0.5) <= 0.15, noise
    assert np.mean(noise) <= np.mean(real) - 0.1, (real, noise)


def test_balance_adds_minority_synthetic_images(split: tuple[Path, Path], tmp_path: Path) -> None:
    train, test = split
    synth = _noise_set(tmp_path / "noise", per_class=4)
    res = _run("--train", str(train), "--test", str(test), "--synth", str(synth), "--out", str(tmp_path / "rep"),
               "--steps", "2", "--batch", "4", "--bootstrap", "100", "--balance", "--seeds", "2", "--seed", "7")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "rep" / "utility.json").read_text())
    assert rep["seeds"] == [7, 8] and "± " in res.stdout
    for r in rep["regimes"].values():
        assert len(r["seeds"]) == 2 and np.sum(r["confusion_summed_over_seeds"]) == 2 * 23
        assert r["macro_auroc"]["std"] == pytest.approx(np.std([x["macro_auroc"] for x in r["seeds"]], ddof=1))
    assert rep["counts"]["train"] == [12, 9]
    assert rep["regimes"]["balanced"]["train_counts"] == [12, 12]
    assert rep["regimes"]["balanced"]["added"] == {"COVID-19": {"needed": 0, "added": 0},
                                                   "Normal": {"needed": 3, "added": 3}}
    assert rep["generator_data"]["verdict"] == "unknown"


def test_classifier_is_deterministic_under_a_seed(split: tuple[Path, Path]) -> None:
    from cxr_ddpm.runtime.inputs.imageio import load_resized
    from cxr_ddpm.train.classifier import predict, train_classifier
    files = list_images(split[0])
    x = np.stack([load_resized(f, 32) for f in files.files])
    y = np.asarray(files.labels)
    runs = [predict(train_classifier(x, y, num_classes=2, steps=3, batch=8, lr=1e-3, seed=s, device="cpu"), x)
            for s in (5, 5, 6)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


# -----------------------------------------------------------------------------
# refusals: one line each, nothing written

def test_a_copy_of_the_test_set_as_synthetic_set_is_refused(split: tuple[Path, Path], tmp_path: Path) -> None:
    train, test = split
    synth = tmp_path / "synth"
    shutil.copytree(test, synth)
    res = _run("--train", str(train), "--test", str(test), "--synth", str(synth), "--out", str(tmp_path / "rep"))
    assert_user_error(res, "--test", "--synth", "share 23 files", "same content", progress=True)
    assert not (tmp_path / "rep").exists()


def test_test_images_in_the_training_set_are_refused(split: tuple[Path, Path], tmp_path: Path) -> None:
    train, test = split
    leaky = tmp_path / "train"
    shutil.copytree(train, leaky)
    one = next((test / "Normal").iterdir())
    shutil.copy2(one, leaky / "Normal" / "renamed.jpg")          # another name, the same bytes
    res = _run("--train", str(leaky), "--test", str(test), "--synth", str(_noise_set(tmp_path / "n", 2)))
    assert_user_error(res, "--train", "share 1 file", f"Normal/{one.name} = Normal/renamed.jpg", progress=True)


def _malformed(kind: str, split: tuple[Path, Path], tmp: Path) -> tuple[list[str], tuple[str, ...]]:
    train, test = split
    synth = _noise_set(tmp / "synth", 3)
    args = {"--train": str(train), "--test": str(test), "--synth": str(synth)}
    if kind == "missing train":
        args["--train"], needles = str(tmp / "nope"), ("--train", "not found")
    elif kind == "class mismatch":
        (synth / "Normal").rename(synth / "Pneumonia")
        needles = ("--synth", "classes (COVID-19, Pneumonia) do not match --train's (COVID-19, Normal)")
    elif kind == "too few test images":
        small = tmp / "test"
        shutil.copytree(test, small)
        for f in sorted((small / "Normal").iterdir())[1:]:
            f.unlink()
        args["--test"], needles = str(small), ("--test", "class Normal has 1 image", "at least 2")
    elif kind == "unconditional record":
        _record(synth, None, classes=False)
        needles = ("--synth", "unconditional", "--per-class")
    elif kind == "corrupt record":
        (synth / "samples.json").write_text("{not json")
        needles = ("--synth", "samples.json", "not a readable sample record")
    elif kind == "loose images":
        flat = tmp / "flat"
        flat.mkdir()
        for f in (train / "Normal").iterdir():
            shutil.copy2(f, flat / f.name)
        args["--train"], needles = str(flat), ("--train", "directly in it", "one folder per class")
    elif kind == "size":
        return [*_flat(args), "--size", "8"], ("--size 8", "at least 16")
    elif kind == "out is a file":
        (tmp / "f").write_text("")
        return [*_flat(args), "--out", str(tmp / "f")], ("--out", "is a file")
    elif kind == "unreadable synthetic":
        (synth / "Normal" / "sample_00000.png").write_bytes(b"not a png")
        needles = ("--synth", "sample_00000.png", "cannot read synthetic image")
    else:
        raise AssertionError(kind)
    return _flat(args), needles


def _flat(args: dict[str, str]) -> list[str]:
    return [x for kv in args.items() for x in kv]


@pytest.mark.parametrize("kind", ["missing train", "class mismatch", "too few test images", "unconditional record",
                                  "corrupt record", "loose images", "size", "out is a file", "unreadable synthetic"])
def test_malformed_inputs_give_one_line(kind: str, split: tuple[Path, Path], tmp_path: Path) -> None:
    argv, needles = _malformed(kind, split, tmp_path)
    out = [] if "--out" in argv else ["--out", str(tmp_path / "rep")]
    res = _run(*argv, "--steps", "1", "--batch", "2", *out)
    assert_user_error(res, *needles, progress=True)
    assert not (tmp_path / "rep").exists() or kind == "out is a file"


# -----------------------------------------------------------------------------
# the generator's training data

def test_generator_data_verdicts(split: tuple[Path, Path], tmp_path: Path, tiny_cfg) -> None:
    """Each way the record -> engine -> checkpoint chain ends, with real artifacts."""
    import onnx

    from cxr_ddpm.runtime.contract.metadata import METADATA_KEY, build_metadata, dumps
    from cxr_ddpm.train.utility_data import _merged_fingerprint, generator_data, hashes, real_set
    train, test = (real_set(p, f) for p, f in zip(split, ("--train", "--test")))
    assert train.images is not None and test.images is not None
    th = hashes(test)
    # train + test merged is the bundled folder itself: the fingerprint rebuilt from two lists
    assert _merged_fingerprint([train.images, test.images]) == list_images(BUNDLED).fingerprint()

    def verdict(record) -> dict:
        return generator_data(record, train.images, test.images, th)

    def rec(engine: Path) -> dict:
        from cxr_ddpm.runtime.fsutil import file_sha256
        return {"engine": str(engine), "engine_sha256": file_sha256(engine)}

    assert verdict(None)["verdict"] == "unknown"
    own = _checkpoint(tmp_path / "a.safetensors", tiny_cfg, train.images.fingerprint())
    assert verdict(rec(own))["verdict"] == "REAL_TEST is not in it"
    on_test = _checkpoint(tmp_path / "b.safetensors", tiny_cfg, test.images.fingerprint())
    assert verdict(rec(on_test))["verdict"] == "REAL_TEST is in it"
    # an unknown fingerprint, the training folder reachable: its files are compared by content
    reach = _checkpoint(tmp_path / "c.safetensors", tiny_cfg, list_images(BUNDLED).fingerprint()[::-1],
                        root=str(BUNDLED))
    v = verdict(rec(reach))
    assert v["verdict"] == "REAL_TEST is in it" and "23 of REAL_TEST's 23 files" in v["detail"], v
    assert "changed since training" in v["detail"]
    gone = _checkpoint(tmp_path / "d.safetensors", tiny_cfg, "0123456789abcdef", root=str(tmp_path / "gone"))
    assert verdict(rec(gone))["verdict"] == "unknown"
    stale = rec(own)
    stale["engine_sha256"] = "0" * 64
    assert "sha256 differs" in verdict(stale)["detail"]
    # an ONNX file names its checkpoint; the fingerprint is the checkpoint's
    doc = build_metadata(tiny_cfg, kind="onnx", class_names=["COVID-19", "Normal"],
                         source={"checkpoint_sha256": rec(on_test)["engine_sha256"], "path": str(on_test)})
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    model = onnx.helper.make_model(graph)
    onnx.helper.set_model_props(model, {METADATA_KEY: dumps(doc)})
    onnx.save(model, str(tmp_path / "gen.onnx"))
    v = verdict(rec(tmp_path / "gen.onnx"))
    assert v["verdict"] == "REAL_TEST is in it", v
    assert v["verdict"] == "REAL_TEST is in it" and v["checkpoint"] == str(on_test)


# -----------------------------------------------------------------------------
# the scores

def test_auroc_is_the_pair_count_and_the_roc_area() -> None:
    from cxr_ddpm.train.utility_report import auroc, bootstrap_indices, roc_curve
    rng = np.random.default_rng(1)
    s = np.round(rng.random(40), 1)                          # many ties
    y = rng.random(40) < 0.4
    pairs = (s[y][:, None] > s[~y][None, :]).mean() + 0.5 * (s[y][:, None] == s[~y][None, :]).mean()
    assert auroc(s, y) == pytest.approx(pairs)
    fpr, tpr = roc_curve(s, y)
    assert np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2) == pytest.approx(pairs)   # trapezoids = ties 1/2
    assert auroc(np.r_[0.1, 0.2, 0.9], np.array([False, False, True])) == 1.0
    labels = np.array([0] * 5 + [1] * 3)
    idx = bootstrap_indices(labels, 50, 0)
    assert (np.sort(labels[idx], axis=1) == np.sort(labels)).all()       # stratified: class counts kept
