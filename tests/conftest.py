"""Shared fixtures: real radiographs, the tiny config, a freshly initialised tiny checkpoint."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_MINI = ROOT.parent / "shared" / "data" / "cxr-mini"   # 44 real radiographs (read-only)
BUNDLED = ROOT / "data" / "cxr-sample"                       # the same images, shipped with the repo


def bundled_patients() -> list[list[dict[str, str]]]:
    """data/cxr-sample's manifest rows (class, file, patient, ...) grouped by patient, patients in
    sorted order: tests split these, never single images, so no patient is on two sides."""
    import csv
    with open(BUNDLED / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [[r for r in rows if r["patient"] == p] for p in sorted({r["patient"] for r in rows})]


def _has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and os.environ.get("CUDA_VISIBLE_DEVICES", "0") != ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none found)")
    no_trt = pytest.mark.skip(reason="needs TensorRT (pip install 'cxr-ddpm[gpu]' on a GPU machine)")
    gpu, trt = _has_gpu(), importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(no_gpu)
        if "tensorrt" in item.keywords and not trt:
            item.add_marker(no_trt)


def assert_user_error(res, *needles: str, progress: bool = False) -> None:
    """A CLI result (click's CliRunner) that failed the way users should see it: exit 2, one
    `error: ...` line on stderr naming every needle, no traceback. progress=True lets other
    (progress/log) lines come first; the error must still be the only error line, and the last."""
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert "Traceback" not in res.output
    lines = [ln for ln in res.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    if progress:
        assert [ln for ln in lines if "error" in ln.lower()] == lines[-1:], res.stderr
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of `size` mounted on `folder` (a full disk as production delivers it); skips
    the test with the reason where mounting is not permitted; unmounted afterwards."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture(scope="session")
def cxr_mini() -> Path:
    """Real chest radiographs in class folders (COVID-19/, Normal/)."""
    return SHARED_MINI if SHARED_MINI.is_dir() else BUNDLED


@pytest.fixture(scope="session")
def tiny_cfg():
    from cxr_ddpm.train.config import load_config
    return load_config(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory, tiny_cfg) -> Path:
    """A consolidated checkpoint of a freshly initialised tiny model (seeded, EMA = online)."""
    import torch

    from cxr_ddpm.train.checkpoint import save_checkpoint
    from cxr_ddpm.train.model import build_unet

    torch.manual_seed(0)
    unet = build_unet(tiny_cfg.model)
    sd = unet.state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    return save_checkpoint(path, cfg=tiny_cfg, step=0, class_names=["COVID-19", "Normal"],
                           ema=sd, online=sd, data_fingerprint="test")


@pytest.fixture(scope="session")
def onnx_path(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Path) -> Path:
    """tiny_ckpt exported to ONNX (legacy exporter), once per session (builders.export_tiny_onnx)."""
    from builders import export_tiny_onnx
    return export_tiny_onnx(tmp_path_factory, tiny_ckpt)


@pytest.fixture()
def odd_dataset(tmp_path: Path, cxr_mini: Path) -> Path:
    """Class folders with one real JPEG each plus every odd format we promise to read
    (16-bit PNG, DICOM, RGBA, truncated, garbage)."""
    from builders import odd_dataset as build
    return build(tmp_path, cxr_mini)


@pytest.fixture(scope="session")
def cluster():
    """A real two-node Slurm cluster on localhost, shared by the Slurm tests of a session;
    skipped with the reason where it cannot run (CI sets CXR_REQUIRE_SLURM=1: then it fails)."""
    from slurm_cluster import SlurmCluster, slurm_unavailable
    reason = slurm_unavailable()
    if reason:
        if os.environ.get("CXR_REQUIRE_SLURM") == "1":
            pytest.fail(f"CXR_REQUIRE_SLURM=1 but: {reason}")
        pytest.skip(reason)
    with SlurmCluster() as c:
        yield c
