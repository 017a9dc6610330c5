"""Build a TensorRT engine from a cxr-ddpm ONNX file with the TensorRT Python API.

Precision comes from the ONNX on both TensorRT 10 and 11: TensorRT 11 builds every
network strongly typed (no FP16/BF16 builder flags); on 10 we ask for the same
(`STRONGLY_TYPED`), so an fp16 engine needs an fp16 ONNX (`cxr-export onnx
--precision fp16`, which keeps the time embedding fp32) and TF32 is cleared.
Those rules live in the small pure functions below (`plan_build`, `profile_shapes`,
`engine_metadata`), unit-tested without TensorRT; `build_engine` is the only code that
touches TensorRT itself. The --batch syntax is export/batch.py's, shared with onnx and verify.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_ddpm.runtime.backends.tensorrt import cuda_call, gpu_info, import_cudart, import_tensorrt
from cxr_ddpm.runtime.contract.engine_file import write_engine
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.fsutil import atomic_write, ensure_writable_dir, file_sha256
from cxr_ddpm.runtime.contract.metadata import read_onnx_metadata

from .batch import Batch, batch_text, recorded_batch

PRECISIONS = ("fp32", "fp16", "bf16")
MIN_TRT_MAJOR = 10


def trt_major(version: str) -> int:
    m = re.match(r"^(\d+)\.", str(version))
    if not m:
        raise CxrError(f"cannot parse TensorRT version {version!r}")
    return int(m.group(1))


@dataclass(frozen=True)
class BuildPlan:
    precision: str                  # the engine's precision: always the ONNX's own
    strongly_typed: bool            # pass NetworkDefinitionCreationFlag.STRONGLY_TYPED (TRT 10; 11 always is)
    clear_flags: tuple[str, ...]    # names in trt.BuilderFlag to clear

    @property
    def tf32(self) -> bool:
        """Whether the engine may run fp32 math in TF32 (recorded in its metadata)."""
        return "TF32" not in self.clear_flags


def plan_build(trt_version: str, precision: str | None, onnx_precision: str) -> BuildPlan:
    """How to build an engine from an ONNX of `onnx_precision`; `precision` None means "the ONNX's".

    Both TensorRT majors build strongly typed networks, so the types in the ONNX decide
    (TensorRT 11 has no other mode; on 10 a weakly typed FP16/BF16 build may move the time
    embedding's Mul/Sin to fp16, which cxr-export onnx keeps fp32 on purpose). TF32 is on by
    default in TensorRT and would run the fp32 convolutions/matmuls (the whole fp32 engine, or
    the fp32 time embedding of an fp16 one) at 10-bit mantissa: cleared, as Polygraphy does.
    """
    major = trt_major(trt_version)
    if major < MIN_TRT_MAJOR:
        raise CxrError(f"TensorRT {trt_version} is too old: cxr-export trt needs TensorRT {MIN_TRT_MAJOR} or newer")
    if onnx_precision not in ("fp32", "fp16"):
        raise CxrError(f"ONNX precision {onnx_precision!r} is not one cxr-export writes (fp32, fp16)")
    precision = onnx_precision if precision is None else precision
    if precision not in PRECISIONS:
        raise CxrError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "bf16":
        raise CxrError("--precision bf16: engines are strongly typed (precision from the ONNX) and "
                       "cxr-export onnx writes no bf16 ONNX; use fp16 or fp32")
    if precision != onnx_precision:
        raise CxrError(f"--precision {precision}: the ONNX is {onnx_precision} and the engine takes its "
                       f"precision from the ONNX types; export with cxr-export onnx --precision {precision}, "
                       f"or leave --precision out")
    return BuildPlan(precision=precision, strongly_typed=major == 10, clear_flags=("TF32",))


def profile_shapes(io: dict[str, Any], batch: Batch) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Per input: (min, opt, max) shapes, the batch axis ("B" in the metadata) set from `batch`."""
    out = {}
    for spec in io["inputs"]:
        dims = spec["shape"]
        out[spec["name"]] = tuple(tuple(b if d == "B" else int(d) for d in dims) for b in batch)
    return out


def engine_metadata(onnx_meta: dict[str, Any], *, trt_version: str, gpu: str, compute_capability: str,
                    onnx_sha256: str, precision: str, batch: Batch,
                    tf32: bool = False) -> dict[str, Any]:
    """The ONNX document, re-labelled kind="tensorrt", plus where and how the engine was built."""
    lo, opt, hi = batch
    return {**onnx_meta, "kind": "tensorrt",
            "tensorrt": {"version": str(trt_version), "gpu": gpu, "compute_capability": compute_capability,
                         "onnx_sha256": onnx_sha256, "precision": precision,
                         "onnx_precision": onnx_meta.get("precision", "fp32"), "tf32": tf32,
                         "strongly_typed": True,
                         "profile": {"min": lo, "opt": opt, "max": hi}}}


def default_engine_path(onnx_path: Path, precision: str) -> Path:
    return onnx_path.with_name(f"{onnx_path.stem}.{precision}.engine")


def build_engine(onnx_path: str | Path, out: str | Path | None = None, *, precision: str | None = None,
                 batch: Batch | None = None, timing_cache: str | Path | None = None,
                 workspace_gb: float = 4.0, device: int = 0) -> Path:
    """ONNX -> engine file (header + plan), written atomically. Returns the engine path.
    batch: the optimization profile (min, opt, max); None = the range the ONNX records."""
    trt = import_tensorrt()                            # the one-line install hint comes first
    onnx_path = Path(onnx_path)
    meta = read_onnx_metadata(onnx_path)               # refuses non-cxr-ddpm ONNX before any GPU work
    plan_spec = plan_build(trt.__version__, precision, meta.get("precision", "fp32"))
    precision = plan_spec.precision
    out = Path(out) if out else default_engine_path(onnx_path, precision)
    ensure_writable_dir(out.parent or Path("."))
    if workspace_gb <= 0:
        raise CxrError(f"--workspace {workspace_gb}: must be > 0 GB")
    batch = batch or recorded_batch(meta) or (1, 1, 1)
    cuda_call(import_cudart().cudaSetDevice(device))   # the builder uses the current device
    gpu, cc = gpu_info(device)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan_spec.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CxrError(f"{onnx_path}: TensorRT cannot parse this ONNX: {errors[:300]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    for name in plan_spec.clear_flags:
        if hasattr(trt.BuilderFlag, name):
            config.clear_flag(getattr(trt.BuilderFlag, name))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(meta["io"], batch).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)

    cache_bytes = b""
    if timing_cache and Path(timing_cache).is_file():
        cache_bytes = Path(timing_cache).read_bytes()
    # ignore_mismatch=True would load another GPU's/version's timings (IBuilderConfig::setTimingCache):
    # refuse those and start a fresh cache instead.
    if not config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False):
        print(f"{timing_cache}: timing cache is from another GPU or TensorRT; starting a fresh one", flush=True)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    print(f"building TensorRT {trt.__version__} {precision} engine for {gpu} (sm {cc}), "
          f"batch {batch_text(batch)} (this takes minutes)...", flush=True)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CxrError(f"{onnx_path}: TensorRT engine build failed (see the log above)")
    doc = engine_metadata(meta, trt_version=trt.__version__, gpu=gpu, compute_capability=cc,
                          onnx_sha256=file_sha256(onnx_path), precision=precision, batch=batch,
                          tf32=plan_spec.tf32)
    write_engine(out, doc, bytes(serialized))
    if timing_cache:
        with atomic_write(timing_cache, "wb") as f:
            f.write(bytes(config.get_timing_cache().serialize()))
    return out
