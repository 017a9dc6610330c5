"""Parity of an exported artifact against the PyTorch U-Net it came from.

The same inputs go through both: x ~ N(0, 1) (the noisy-image scale), t at the
start, middle and end of the schedule, at the distinct sizes of a batch range
(verify_artifact: by default the range the artifact records, batch.py). The
error reported per case is max|artifact - torch| and that divided by the
reference output's std ("rel"): a U-Net's output scale differs between models
and timesteps, so the tolerance applies to the scaled error. Defaults: 1e-4 for
fp32 artifacts, 2e-2 for fp16 ones.

    report = verify_artifact("tiny.fp16.onnx", "runs/tiny")
    print(report.table()); report.ok
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from cxr_ddpm.train.config import Config
from cxr_ddpm.runtime.contract.artifact import Artifact
from cxr_ddpm.runtime.backends.denoiser import Denoiser
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.contract.interface import io_spec, random_inputs

from .batch import VERIFY_DEFAULT, Batch, batch_sizes, batch_text, recorded_batch

TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}
Runner = Callable[[dict[str, np.ndarray]], np.ndarray]


def default_tolerance(precision: str) -> float:
    return TOLERANCE[precision]


def default_timesteps(T: int) -> tuple[int, ...]:
    return tuple(sorted({0, T // 2, T - 1}))


@dataclass
class Row:
    timestep: int
    batch: int
    max_abs: float
    rel: float            # max_abs / std(reference output)
    ok: bool


@dataclass
class VerifyReport:
    rows: list[Row]
    tol: float
    precision: str
    backend: str

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def worst(self) -> Row:
        return max(self.rows, key=lambda r: r.rel)

    def summary(self) -> str:
        w = self.worst()
        return (f"worst error {w.rel:.2e} x output std (max abs {w.max_abs:.2e}) at t={w.timestep}, "
                f"batch {w.batch}; tolerance {self.tol:.0e} ({self.precision}, {self.backend})")

    def table(self) -> str:
        lines = [f"{'t':>6} {'batch':>5} {'max abs':>10} {'rel':>10}  ok",
                 *(f"{r.timestep:>6} {r.batch:>5} {r.max_abs:>10.2e} {r.rel:>10.2e}  {'yes' if r.ok else 'NO'}"
                   for r in self.rows)]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"tol": self.tol, "precision": self.precision, "backend": self.backend, "ok": self.ok,
                "rows": [r.__dict__ for r in self.rows]}


def torch_runner(wrapper: Any, io: dict[str, Any]) -> Runner:
    import torch
    names = [s["name"] for s in io["inputs"]]

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return wrapper(*(torch.from_numpy(feeds[n]) for n in names)).float().numpy()
    return run


def adapter_runner(den: Denoiser) -> Runner:
    """Named inputs through the denoiser that samples (its feeds, dtype casts and fp32 output):
    parity is checked on the call convention users get, not on a bare session."""
    return lambda feeds: np.asarray(den(feeds["x"], feeds["t"], feeds.get("x_self_cond"), feeds.get("class")))


def ort_denoiser(path: str | Path | Artifact, provider: str = "cpu") -> Denoiser:
    """The ONNX backend on `path` (the adapter sampling uses; its session from
    backends.onnx.open_session). TF32 always off: the fp32 tolerance (1e-4) is for fp32 math, and
    ORT's CUDA provider would otherwise run fp32 MatMul/Conv in TF32 (its default); no CUDA
    graphs (the cases change shapes)."""
    from cxr_ddpm.runtime.backends.onnx import OrtDenoiser
    if provider not in ("cpu", "cuda"):
        raise CxrError(f"--provider {provider}: verify runs ONNX models on cpu or cuda")
    return OrtDenoiser(path, provider=provider, tf32=False, cuda_graph="off")


def ort_runner(path: str | Path, provider: str = "cpu") -> Runner:
    return adapter_runner(ort_denoiser(path, provider))


def compare(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    if ref.shape != got.shape:
        raise CxrError(f"artifact output shape {got.shape} differs from the PyTorch output {ref.shape}")
    got = got.astype(np.float64)
    ref = ref.astype(np.float64)
    if not np.isfinite(got).all():
        return float("inf"), float("inf")
    max_abs = float(np.abs(got - ref).max())
    return max_abs, max_abs / max(float(ref.std()), 1e-6)


def run_parity(run: Runner, reference: Runner, cfg: Config, io: dict[str, Any], *, precision: str,
               batches: tuple[int, ...], tol: float, backend: str,
               timesteps: tuple[int, ...] | None = None, seed: int = 0) -> VerifyReport:
    cases = [(t, b) for t in (timesteps or default_timesteps(cfg.diffusion.timesteps)) for b in batches]
    rows = []
    for i, (t, b) in enumerate(tqdm(cases, desc=f"verify {backend}", unit="case", leave=False)):
        feeds = random_inputs(io, b, timesteps=cfg.diffusion.timesteps, num_classes=cfg.model.num_classes,
                              seed=seed + i, timestep=t)
        max_abs, rel = compare(reference(feeds), run(feeds))
        rows.append(Row(t, b, max_abs, rel, rel <= tol))
    return VerifyReport(rows, tol, precision, backend)


def check_parity(onnx_path: str | Path, wrapper: Any, cfg: Config, *, precision: str,
                 batches: tuple[int, ...] = (1, 3), tol: float | None = None, source: str | None = None,
                 provider: str = "cpu", timesteps: tuple[int, ...] | None = None) -> VerifyReport:
    """ORT (on `onnx_path`) vs the PyTorch `wrapper`: the check export_onnx runs before renaming."""
    io = io_spec(cfg.model)
    return run_parity(ort_runner(onnx_path, provider), torch_runner(wrapper, io), cfg, io,
                      precision=precision, batches=batches, backend=f"onnxruntime-{provider}",
                      tol=tol if tol is not None else default_tolerance(precision), timesteps=timesteps)


def verify_artifact(artifact: str | Path, ckpt: str | Path, *, config: Config | None = None,
                    provider: str = "cpu", batch: Batch | None = None, tol: float | None = None,
                    onnx_sha256: str | None = None, derive_diffusion: bool = False) -> VerifyReport:
    """Re-run the parity check on an ONNX file or engine against the checkpoint it came from,
    at the distinct sizes of `batch` (min, opt, max). None: the range the artifact records (an
    engine's profile, an ONNX's export range), else batch.VERIFY_DEFAULT. An engine refuses a
    range outside its profile."""
    from cxr_ddpm.runtime.contract.artifact import open_artifact
    from cxr_ddpm.train.checkpoint import load_checkpoint
    from cxr_ddpm.train.model import Denoiser as DenoiserNet

    artifact = Path(artifact)
    if not artifact.exists():
        raise CxrError(f"{artifact}: artifact not found")
    art = open_artifact(artifact)
    if art.kind == "checkpoint":
        raise CxrError(f"{artifact}: is a checkpoint; verify checks an ONNX model or TensorRT engine against one")
    engine, meta = art.kind == "tensorrt", art.meta
    recorded = recorded_batch(meta)
    batches = batch_sizes(batch or recorded or VERIFY_DEFAULT)
    if engine and recorded and batch and not recorded[0] <= batches[0] <= batches[-1] <= recorded[2]:
        raise CxrError(f"--batch {batch_text(batch)}: outside the engine's profile {batch_text(recorded)}; "
                       "leave --batch out to check the profile's own sizes")
    ck = load_checkpoint(ckpt, config, derive_diffusion=derive_diffusion)
    src = meta.get("source") or {}
    if src.get("checkpoint_sha256") and ck.sha256 and src["checkpoint_sha256"] != ck.sha256:
        raise CxrError(f"{artifact}: exported from another checkpoint (step {src.get('step')}, sha256 "
                       f"{src['checkpoint_sha256'][:12]}...) than {ck.path} (step {ck.step}, "
                       f"sha256 {ck.sha256[:12]}...)")
    if ck.cfg.model != art.spec.model:
        raise CxrError(f"{artifact}: its model config differs from the checkpoint's ({ck.path})")
    wrapper = DenoiserNet(ck.build_unet(ema=src.get("weights", "ema") == "ema"), ck.cfg.model)
    io = art.io.to_dict()
    den: Denoiser
    if engine:
        from cxr_ddpm.runtime.backends.trt_adapter import TrtDenoiser
        trt = meta["tensorrt"]
        den = TrtDenoiser(art, cuda_graph="off", onnx_sha256=onnx_sha256)
        precision, backend = trt["precision"], "tensorrt"
    else:
        den = ort_denoiser(art, provider)
        precision, backend = art.precision or "fp32", f"onnxruntime-{provider}"
    with den:
        return run_parity(adapter_runner(den), torch_runner(wrapper, io), ck.cfg, io, precision=precision,
                          batches=batches, tol=tol if tol is not None else default_tolerance(precision),
                          backend=backend)
