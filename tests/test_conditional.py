"""Class-conditional CXR end to end: train (2 classes) -> export -> sample per class with guidance."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cxr_ddpm.runtime.cli import main as runtime_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory: pytest.TempPathFactory, cxr_mini: Path) -> Path:
    """A tiny conditional model trained a few steps on the real radiographs (COVID-19 / Normal)."""
    run = tmp_path_factory.mktemp("cond") / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    cmd = [str(Path(sys.executable).parent / "cxr-train"), "fit", "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--data", str(cxr_mini), "--out", str(run), "--set", "model.num_classes=2",
           "--set", "diffusion.beta_schedule=cosine", "--set", "data.class_balanced=true",
           "--set", "train.steps=6", "--set", "train.save_every=6", "--set", "train.sample_every=6",
           "--set", "train.num_samples=4", "--set", "train.micro_batch=4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run


@pytest.fixture(scope="module")
def cond_onnx(cond_run: Path) -> Path:
    from cxr_ddpm.export.onnx_export import export_onnx
    # verification runs here: ORT vs PyTorch over every class id plus the null id
    res = export_onnx(cond_run, cond_run / "cond.onnx", exporter="legacy", verify=True)
    return res.path


def test_training_keeps_class_names_and_grid_rows(cond_run: Path) -> None:
    from PIL import Image

    from cxr_ddpm.train.checkpoint import load_checkpoint
    ck = load_checkpoint(cond_run)
    assert ck.class_names == ["COVID-19", "Normal"] and ck.cfg.model.num_classes == 2
    grid = Image.open(next((cond_run / "samples").glob("*.png")))
    assert grid.size == (2 + 2 * 34, 2 + 2 * 34)       # 2 classes (rows) x 2 samples, 32 px + gutters


def test_export_metadata_lists_classes_and_null(cond_onnx: Path) -> None:
    from cxr_ddpm.runtime.contract.metadata import read_onnx_metadata
    meta = read_onnx_metadata(cond_onnx)
    assert meta["class_names"] == ["COVID-19", "Normal"] and meta["null_class"] == 2
    assert "class" in [i["name"] for i in meta["io"]["inputs"]]


def test_guidance_weights_and_batched_call(cond_onnx: Path) -> None:
    from cxr_ddpm.runtime.backends import load_denoiser
    from cxr_ddpm.runtime.sampling.guidance import guided

    den = load_denoiser(cond_onnx)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 1, 32, 32)).astype(np.float32)
    t = np.array([10, 50, 90], np.int64)
    cls = np.array([0, 1, 0], np.int64)
    cond = den(x, t, classes=cls)
    uncond = den(x, t, classes=np.full(3, 2, np.int64))
    assert np.abs(cond - uncond).max() > 1e-4          # the class input matters
    np.testing.assert_array_equal(guided(den, cls, 1.0, 2)(x, t), cond)
    np.testing.assert_array_equal(guided(den, cls, 0.0, 2)(x, t), uncond)
    calls = []
    counting = lambda x, t, classes=None, x_self_cond=None: calls.append(x.shape[0]) or den(x, t, classes=classes)
    out = guided(counting, cls, 3.0, 2)(x, t)
    assert calls == [6]                                 # one engine call on the 2B batch
    np.testing.assert_allclose(out, uncond + 3.0 * (cond - uncond), atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp-2m"])
def test_sample_per_class(cond_onnx: Path, tmp_path: Path, sampler: str) -> None:
    steps = [] if sampler == "ddpm" else ["--steps", "4"]
    res = CliRunner().invoke(runtime_cli, ["sample", "--engine", str(cond_onnx), "--per-class", "2",
                                           "--guidance", "2.5", "--sampler", sampler, *steps,
                                           "--out", str(tmp_path / "s"), "--grid", str(tmp_path / "g.png"),
                                           "--batch-size", "3"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "s" / "COVID-19").iterdir()) == ["sample_00000.png", "sample_00001.png"]
    assert sorted(p.name for p in (tmp_path / "s" / "Normal").iterdir()) == ["sample_00002.png", "sample_00003.png"]
    rec = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert rec["guidance"] == 2.5 and rec["classes"] == ["COVID-19", "Normal"] and len(rec["files"]) == 4


def test_named_class_and_seed_stability(cond_onnx: Path, tmp_path: Path) -> None:
    """--class Normal -n 2: image i depends on (seed, i) and its class, not on the batch size."""
    outs = []
    for bs in ("1", "2"):
        res = CliRunner().invoke(runtime_cli, ["sample", "--engine", str(cond_onnx), "--class", "Normal", "-n", "2",
                                               "--guidance", "2", "--steps", "3", "--format", "npy",
                                               "--batch-size", bs, "--out", str(tmp_path / bs)])
        assert res.exit_code == 0, res.output
        outs.append([np.load(p) for p in sorted((tmp_path / bs / "Normal").glob("*.npy"))])
    assert len(outs[0]) == 2
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


def test_unknown_class_is_refused(cond_onnx: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(runtime_cli, ["sample", "--engine", str(cond_onnx), "--class", "Pneumonia",
                                           "--out", str(tmp_path / "s")])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "valid: COVID-19, Normal" in lines[0]
    assert not (tmp_path / "s").exists()


def test_class_on_unconditional_model_is_refused(tiny_ckpt: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(runtime_cli, ["sample", "--engine", str(tiny_ckpt), "--class", "Normal",
                                           "--out", str(tmp_path / "s")])
    assert res.exit_code == 2 and "unconditional model" in res.output
    assert not (tmp_path / "s").exists()


def test_sigmoid_schedule_with_classes_is_refused_early() -> None:
    from cxr_ddpm.train.config import load_config
    from cxr_ddpm.runtime.errors import CxrError
    with pytest.raises(CxrError, match="beta_schedule linear or cosine"):
        load_config(ROOT / "configs" / "tiny.yaml", ["model.num_classes=4"])
