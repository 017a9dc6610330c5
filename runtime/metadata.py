"""The artifact metadata format: one JSON document that every artifact carries.

Checkpoints (.safetensors metadata), ONNX models (`metadata_props`) and TensorRT
engines (file header) all store a document under the key `cxr_ddpm` with at least:

    format_version  int, this module's FORMAT_VERSION when written
    kind            "checkpoint" | "onnx" | "tensorrt"
    config          the full Config.to_dict() (model, diffusion, data, train)
    schedule        {timesteps, beta_schedule, objective, ..., betas, alphas_cumprod_sha256}
    image_size, channels, objective
    class_names     list of str (folder names), [] when unknown
    provenance      {package_version, git_commit, created, ...}

Readers refuse a document with a newer format_version than they know, so an old
runtime never silently misreads a new artifact.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import datetime as _dt
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .config import Config
from .errors import CxrError
from .schedule import Schedule

METADATA_KEY = "cxr_ddpm"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "kind", "config", "schedule", "image_size", "channels",
                 "objective", "class_names", "provenance")


def schedule_metadata(cfg: Config) -> dict[str, Any]:
    """The diffusion config plus the schedule's values: betas (float64, as JSON floats, which
    round-trip exactly) and the hash of alphas_cumprod. With the values stored, an artifact
    samples the same after the schedule code changes."""
    sched = Schedule.from_config(cfg.diffusion)
    out = dataclasses.asdict(cfg.diffusion)
    out["betas"] = [float(b) for b in sched.betas]
    out["alphas_cumprod_sha256"] = sched.digest()
    return out


def schedule_from_metadata(meta: dict[str, Any], source: str, cfg: Config | None = None) -> Schedule:
    """The artifact's schedule: its stored betas when present (newer artifacts), else rebuilt
    from its diffusion config (older ones); checked against the stored hash."""
    sched_meta = meta["schedule"]
    cfg = cfg or config_from_metadata(meta, source)
    if "betas" in sched_meta:
        betas = np.asarray(sched_meta["betas"], dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] != cfg.diffusion.timesteps:
            raise CxrError(f"{source}: schedule betas hold {betas.size} values for T={cfg.diffusion.timesteps}")
        schedule = Schedule(betas=betas, objective=cfg.diffusion.objective)
    else:
        schedule = Schedule.from_config(cfg.diffusion)
    if sched_meta.get("alphas_cumprod_sha256") not in (None, schedule.digest()):
        what = "its stored betas" if "betas" in sched_meta else "its diffusion config"
        raise CxrError(f"{source}: schedule hash in metadata does not match {what}")
    return schedule


def git_commit() -> str | None:
    """Commit of the source tree this package runs from, when it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance(**extra: Any) -> dict[str, Any]:
    return {"package_version": __version__, "git_commit": git_commit(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **extra}


def build_metadata(cfg: Config, *, kind: str, class_names: list[str],
                   provenance_extra: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """The common document; callers add kind-specific fields (step, io, exporter, ...)."""
    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": cfg.to_dict(),
        "schedule": schedule_metadata(cfg),
        "image_size": cfg.model.image_size,
        "channels": cfg.model.channels,
        "objective": cfg.diffusion.objective,
        "class_names": list(class_names),
        "provenance": provenance(**(provenance_extra or {})),
        **fields,
    }


@dataclass(frozen=True)
class ArtifactInfo:
    """An artifact's metadata, parsed and checked once, with the config and schedule built from it."""
    meta: dict[str, Any]
    config: Config
    schedule: Schedule


def read_metadata(text: str | bytes | None, source: str) -> ArtifactInfo:
    """Parse and check a metadata document once; CxrError naming `source` when it is unusable."""
    if text is None:
        raise CxrError(f"{source}: no '{METADATA_KEY}' metadata (not a cxr-ddpm artifact?)")
    try:
        meta = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise CxrError(f"{source}: metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CxrError(f"{source}: metadata must be a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise CxrError(f"{source}: metadata lacks {', '.join(missing)}")
    version = meta["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CxrError(f"{source}: metadata format_version {version} is newer than this "
                       f"cxr-ddpm understands ({FORMAT_VERSION}); upgrade cxr-ddpm")
    cfg = config_from_metadata(meta, source)
    return ArtifactInfo(meta, cfg, schedule_from_metadata(meta, source, cfg))


def parse_metadata(text: str | bytes | None, source: str) -> dict[str, Any]:
    """The checked metadata document alone (see read_metadata)."""
    return read_metadata(text, source).meta


def config_from_metadata(meta: dict[str, Any], source: str) -> Config:
    return Config.from_dict(meta["config"], f"{source} (embedded config)")


def dumps(meta: dict[str, Any]) -> str:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"))


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The checked metadata document of an ONNX artifact (torch-free).

    Uses the `onnx` package when installed (parses the protobuf only: no graph
    optimisation, cheap for big models), else an onnxruntime session.
    """
    src = str(path)
    path = Path(path)
    if not path.is_file():
        raise CxrError(f"{src}: ONNX file not found" if not path.exists() else f"{src}: not a file")
    try:
        import onnx
    except ImportError:
        onnx = None
    try:
        if onnx is not None:
            model = onnx.load(str(path), load_external_data=False)
            props = {p.key: p.value for p in model.metadata_props}
        else:
            import onnxruntime as ort
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            props = dict(sess.get_modelmeta().custom_metadata_map)
    except Exception as e:  # protobuf DecodeError, ORT InvalidProtobuf/Fail: all mean "not a model"
        raise CxrError(f"{src}: not a readable ONNX model ({' '.join(str(e).split())[:120]})") from None
    return parse_metadata(props.get(METADATA_KEY), src)
