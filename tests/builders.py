"""Builders shared by several test modules (tests import this and conftest, never each other)."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def export_tiny_onnx(tmp_path_factory: pytest.TempPathFactory, ckpt: Path) -> Path:
    """The tiny checkpoint as ONNX via cxr-export's export_onnx, once per test session
    (cached under pytest's base temp; the legacy exporter takes ~5 s, dynamo ~25 s)."""
    from cxr_ddpm.export.onnx_export import export_onnx
    out = tmp_path_factory.getbasetemp() / "runtime-onnx" / "tiny.onnx"
    if not out.exists():
        out.parent.mkdir(exist_ok=True)
        export_onnx(ckpt, out, exporter="legacy", verify=False, log=lambda msg: None)
    return out


def run(*args: str | Path):
    """`cxr-runtime ARGS` in this process (click's CliRunner), exceptions not caught."""
    from click.testing import CliRunner

    from cxr_ddpm.runtime.cli import main
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def sample(engine: Path, out: Path, *extra: str | Path):
    return run("sample", "--engine", engine, "--out", out, "--threads", "1", *extra)


def with_metadata(src: Path, dst: Path, edit) -> Path:
    """A copy of the ONNX model `src` at `dst` whose metadata document is edit(old text);
    edit returning None drops the document."""
    import onnx

    from cxr_ddpm.runtime.contract.metadata import METADATA_KEY
    model = onnx.load(str(src))
    props = {p.key: p.value for p in model.metadata_props}
    del model.metadata_props[:]
    value = edit(props.get(METADATA_KEY))
    if value is not None:
        model.metadata_props.add(key=METADATA_KEY, value=value)
    onnx.save(model, str(dst))
    return dst


def record_provider_lists(monkeypatch: pytest.MonkeyPatch) -> list[list]:
    """Every provider list open_session builds (the real function, recorded), also for sessions
    that are then refused because this onnxruntime has no GPU provider."""
    from cxr_ddpm.runtime.backends import onnx as backend
    seen: list[list] = []
    real = backend.provider_list

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]
    monkeypatch.setattr(backend, "provider_list", spy)
    return seen


def lucidrains_file(path: Path, cfg) -> dict:
    """Exactly what lucidrains' Trainer.save writes (model, ema via ema_pytorch, step, ...)."""
    import torch
    from ema_pytorch import EMA

    from cxr_ddpm.train.model import build_diffusion
    diffusion = build_diffusion(cfg)
    ema = EMA(diffusion, beta=0.9)
    with torch.no_grad():
        for p in diffusion.parameters():
            p.add_(0.05)
    ema.update()                           # ema_pytorch copies the weights before update_after_step
    with torch.no_grad():
        for p in diffusion.parameters():   # so move the online weights on: EMA and online differ
            p.add_(0.01)
    data = {"step": 7, "model": diffusion.state_dict(), "opt": {}, "ema": ema.state_dict(),
            "scaler": None, "version": "2.3.4"}
    torch.save(data, path)
    return data


def ramp(h: int = 60, w: int = 80) -> np.ndarray:
    return np.tile(np.linspace(0.0, 1.0, w), (h, 1))


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2",
                window: tuple[float, float] | None = None) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def odd_dataset(tmp_path: Path, cxr_mini: Path) -> Path:
    """Class folders with one real JPEG each plus every odd format we promise to read
    (conftest's `odd_dataset` fixture)."""
    root = tmp_path / "odd"
    (root / "A").mkdir(parents=True)
    (root / "B").mkdir()
    real = sorted((cxr_mini / "COVID-19").glob("*.jpg"))[0]
    shutil.copy(real, root / "A" / "real.jpg")
    from PIL import Image
    gray = ramp()
    Image.fromarray((gray * 4095).astype(np.uint16)).save(root / "A" / "deep16.png")  # 12 bits used
    rgba = np.zeros((60, 80, 4), np.uint8)
    rgba[..., :3] = (gray * 255).astype(np.uint8)[..., None]
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(root / "B" / "rgba.png")
    Image.fromarray((gray * 255).astype(np.uint8)).convert("RGB").save(root / "B" / "rgb.jpg")
    write_dicom(root / "B" / "mono2.dcm", gray * 4095)
    write_dicom(root / "B" / "mono1.dcm", gray * 4095, photometric="MONOCHROME1")
    data = (root / "A" / "real.jpg").read_bytes()
    (root / "A" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "B" / "notanimage.png").write_bytes(b"hello, I am text")
    return root


# ---------------------------------------------------------------- training runs (cxr-train fit, real DeepSpeed)

TINY = str(ROOT / "configs" / "tiny.yaml")
BIN = Path(sys.executable).parent
FAST = ["train.micro_batch=2", "train.sample_every=0", "train.log_every=1", "train.save_every=0",
        "data.num_workers=0", "train.warmup_steps=2"]


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items()
         if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
         and not k.startswith("SLURM_")}
    # these tests mean CPU (gloo), also on a GPU machine
    return {**e, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", **extra}


def fit_cmd(data: Path, out: Path, *sets: str, resume: str | None = None) -> list[str]:
    cmd = [str(BIN / "cxr-train"), "fit", "--config", TINY, "--data", str(data), "--out", str(out)]
    for s in [*FAST, *sets]:
        cmd += ["--set", s]
    return cmd + (["--resume", resume] if resume else [])


def losses(run: Path) -> list[tuple[int, str]]:
    with open(run / "log.csv", newline="") as f:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(f)]


def run_ok(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300, **kw)
    assert p.returncode == 0, p.stderr[-3000:]
    return p
