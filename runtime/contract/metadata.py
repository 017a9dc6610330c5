"""The artifact contract: one JSON document that every artifact carries (specified in
docs/artifact-contract.schema.json; README "The artifact contract").

Checkpoints (.safetensors metadata), ONNX models (`metadata_props`) and TensorRT engines (file
header) store it under the key `cxr_ddpm`:

    format_version  int, the contract's major version (what 0.2.0 wrote and compares)
    format_minor    int, the minor version (absent: 0, i.e. 0.2.0's documents are 1.0)
    kind            "checkpoint" | "onnx" | "tensorrt"
    config          the contract sections {model, diffusion} (runtime/contract/config.py)
    schedule        {the diffusion keys, betas, alphas_cumprod_sha256}
    image_size, channels, objective
    class_names     list of str (folder names), [] when unknown
    provenance      {package_version, git_commit, created, training: {data, train}, ...}

The version rule: a reader loads every document of its major version. A newer minor only adds
(keys an older reader may skip, in any section); a change an older reader would misread is a
new major, refused in one line that names both versions. What training and data settings a
document carries are provenance: shown by `cxr-runtime inspect`, never validated by the runtime
(1.0 documents kept them in `config`; they are read as provenance there too).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import io
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Protocol

import numpy as np

from .. import __version__
from .config import DiffusionConfig, ModelConfig, ModelSpec
from ..errors import CxrError
from ..sampling.schedule import Schedule

METADATA_KEY = "cxr_ddpm"
FORMAT_MAJOR = 1
FORMAT_MINOR = 1
FORMAT_VERSION = FORMAT_MAJOR            # the integer under "format_version"
CONTRACT_SECTIONS = ("model", "diffusion")
REQUIRED_KEYS = ("format_version", "kind", "config", "schedule", "image_size", "channels",
                 "objective", "class_names", "provenance")


class Sections(Protocol):
    """What build_metadata needs of a config: training's Config or the runtime's ModelSpec."""
    @property
    def model(self) -> ModelConfig: ...
    @property
    def diffusion(self) -> DiffusionConfig: ...
    def to_dict(self) -> dict[str, Any]: ...


def version_text(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def contract_version(meta: dict[str, Any], source: str) -> tuple[int, int]:
    """(major, minor) of a document; refuses, in one line naming both versions, a newer major."""
    for name in ("format_version", "format_minor"):
        value = meta.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CxrError(f"{source}: metadata {name} {value!r} is not a version number")
    major, minor = int(meta.get("format_version", 0)), int(meta.get("format_minor", 0))
    if major > FORMAT_MAJOR:
        raise CxrError(f"{source}: metadata format_version {major}.{minor} is newer than this cxr-ddpm "
                       f"understands ({FORMAT_MAJOR}.{FORMAT_MINOR}); upgrade cxr-ddpm")
    if major < 1:
        raise CxrError(f"{source}: metadata format_version {major} is not a cxr-ddpm format (1 or later)")
    return major, minor


def training_sections(meta: dict[str, Any]) -> dict[str, Any]:
    """The training and data settings a document records, as written (never validated here):
    provenance.training (1.1 and later), else the non-contract sections of config (1.0)."""
    prov = meta.get("provenance")
    if isinstance(prov, dict) and isinstance(prov.get("training"), dict):
        return dict(prov["training"])
    cfg = meta.get("config")
    return {k: v for k, v in cfg.items() if k not in CONTRACT_SECTIONS} if isinstance(cfg, dict) else {}


def spec_from_metadata(meta: dict[str, Any], source: str, version: tuple[int, int] | None = None) -> ModelSpec:
    """The contract sections of a document: unknown keys refused at this reader's minor version or
    older, skipped in a newer minor's (its additions, by the version rule)."""
    version = version or contract_version(meta, source)
    contract = meta.get("config")
    if isinstance(contract, dict):
        contract = {k: v for k, v in contract.items() if k in CONTRACT_SECTIONS}
    newer_minor = version[0] == FORMAT_MAJOR and version[1] > FORMAT_MINOR
    return ModelSpec.from_dict(contract, f"{source} (embedded config)", ignore_unknown=newer_minor)


def schedule_metadata(cfg: Sections) -> dict[str, Any]:
    """The diffusion config plus the schedule's values: betas (float64, as JSON floats, which
    round-trip exactly) and the hash of alphas_cumprod. With the values stored, an artifact
    samples the same after the schedule code changes."""
    sched = Schedule.from_config(cfg.diffusion)
    out = dataclasses.asdict(cfg.diffusion)
    out["betas"] = [float(b) for b in sched.betas]
    out["alphas_cumprod_sha256"] = sched.digest()
    return out


def schedule_from_metadata(meta: dict[str, Any], source: str, spec: Any = None) -> Schedule:
    """The artifact's schedule: its stored betas when present (newer artifacts), else rebuilt
    from its diffusion config (older ones); checked against the stored hash.
    spec: the document's ModelSpec (or anything with .diffusion), when already built."""
    sched_meta = meta["schedule"]
    if not isinstance(sched_meta, dict):
        raise CxrError(f"{source}: metadata 'schedule' must be a mapping")
    diffusion = (spec or spec_from_metadata(meta, source)).diffusion
    if "betas" in sched_meta:
        try:
            betas = np.asarray(sched_meta["betas"], dtype=np.float64)
        except (TypeError, ValueError):
            raise CxrError(f"{source}: schedule betas are not a list of numbers") from None
        if betas.ndim != 1 or betas.shape[0] != diffusion.timesteps:
            raise CxrError(f"{source}: schedule betas hold {betas.size} values for T={diffusion.timesteps}")
        schedule = Schedule(betas=betas, objective=diffusion.objective)
    else:
        schedule = Schedule.from_config(diffusion)
    if sched_meta.get("alphas_cumprod_sha256") not in (None, schedule.digest()):
        what = "its stored betas" if "betas" in sched_meta else "its diffusion config"
        raise CxrError(f"{source}: schedule hash in metadata does not match {what}")
    return schedule


@functools.cache
def git_commit() -> str | None:
    """Commit of the source tree this package runs from, when it is a git checkout. Asked once
    per process (every checkpoint save records it): the code that runs does not change meanwhile."""
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


def build_metadata(cfg: Sections, *, kind: str, class_names: list[str],
                   provenance_extra: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """The common document; callers add kind-specific fields (step, io, exporter, ...). The
    contract sections of `cfg` go under config, every other section (training's data, train)
    under provenance.training."""
    sections = cfg.to_dict()
    training = {k: v for k, v in sections.items() if k not in CONTRACT_SECTIONS}
    return {
        "format_version": FORMAT_MAJOR,
        "format_minor": FORMAT_MINOR,
        "kind": kind,
        "config": {k: sections[k] for k in CONTRACT_SECTIONS},
        "schedule": schedule_metadata(cfg),
        "image_size": cfg.model.image_size,
        "channels": cfg.model.channels,
        "objective": cfg.diffusion.objective,
        "class_names": list(class_names),
        "provenance": provenance(**(provenance_extra or {}), **({"training": training} if training else {})),
        **fields,
    }


@dataclass(frozen=True)
class ArtifactInfo:
    """A document, parsed and checked once: its version, contract sections and schedule."""
    meta: dict[str, Any]
    spec: ModelSpec
    schedule: Schedule
    version: tuple[int, int]


def read_metadata(text: str | bytes | None, source: str) -> ArtifactInfo:
    """Parse and check a metadata document once; CxrError naming `source` when it is unusable."""
    if text is None:
        raise CxrError(f"{source}: no '{METADATA_KEY}' metadata (not a cxr-ddpm artifact?)")
    try:
        meta = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise CxrError(f"{source}: metadata is not valid JSON ({e})") from None
    return check_metadata(meta, source)


def check_metadata(meta: Any, source: str) -> ArtifactInfo:
    """Check a parsed document against the contract (see read_metadata)."""
    if not isinstance(meta, dict):
        raise CxrError(f"{source}: metadata must be a JSON object")
    # the version first: a newer major's document may be laid out differently
    version = contract_version(meta, source) if "format_version" in meta else None
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing or version is None:
        raise CxrError(f"{source}: metadata lacks {', '.join(missing)}")
    if not isinstance(meta["class_names"], list) or not all(isinstance(c, str) for c in meta["class_names"]):
        raise CxrError(f"{source}: metadata class_names must be a list of strings")
    spec = spec_from_metadata(meta, source, version)
    return ArtifactInfo(meta, spec, schedule_from_metadata(meta, source, spec), version)


def parse_metadata(text: str | bytes | None, source: str) -> dict[str, Any]:
    """The checked metadata document alone (see read_metadata)."""
    return read_metadata(text, source).meta


def dumps(meta: dict[str, Any]) -> str:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"))


# -----------------------------------------------------------------------------
# ONNX: the document straight from the protobuf, without onnx, a session or the weights

_ONNX_GRAPH, _ONNX_METADATA_PROPS = 7, 14        # ModelProto field numbers (onnx/onnx.proto)


def _varint(f: BinaryIO) -> int:
    value = 0
    for shift in range(0, 70, 7):
        b = f.read(1)
        if not b:
            raise ValueError("truncated varint")
        value |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return value
    raise ValueError("varint longer than 10 bytes")


def _fields(f: BinaryIO, size: int, want: tuple[int, ...]) -> Iterator[tuple[int, bytes | None]]:
    """(field number, payload for length-delimited fields in `want`, else None) of one protobuf
    message spanning `size` bytes of f; every other field is skipped by seeking."""
    end = f.tell() + size
    while f.tell() < end:
        key = _varint(f)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        payload = None
        if wire == 0:
            _varint(f)
        elif wire in (1, 5):
            f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
        elif wire == 2:
            n = _varint(f)
            if f.tell() + n > end:
                raise ValueError(f"field {number} runs past the end")
            if number in want:
                payload = f.read(n)
            else:
                f.seek(n, os.SEEK_CUR)
        else:
            raise ValueError(f"wire type {wire}")
        if f.tell() > end:
            raise ValueError(f"field {number} runs past the end")
        yield number, payload


def onnx_metadata_props(path: str | Path) -> dict[str, str]:
    """ModelProto.metadata_props of an ONNX file, reading only the top-level fields (the graph,
    weights included, is skipped by seeking): cheap for any model size. ValueError if the file
    is not a model."""
    props: dict[str, str] = {}
    has_graph = False
    with open(path, "rb") as f:
        for number, payload in _fields(f, os.fstat(f.fileno()).st_size, (_ONNX_METADATA_PROPS,)):
            has_graph |= number == _ONNX_GRAPH
            if payload is not None:                   # StringStringEntryProto {1: key, 2: value}
                entry = {n: v for n, v in _fields(io.BytesIO(payload), len(payload), (1, 2)) if v is not None}
                props[entry.get(1, b"").decode()] = entry.get(2, b"").decode()
    if not has_graph:
        raise ValueError("no graph")
    return props


def read_onnx_info(path: str | Path) -> ArtifactInfo:
    """The checked document of an ONNX artifact (torch-, onnx- and session-free)."""
    src = str(path)
    path = Path(path)
    if not path.is_file():
        raise CxrError(f"{src}: ONNX file not found" if not path.exists() else f"{src}: not a file")
    try:
        props = onnx_metadata_props(path)
    except OSError as e:
        raise CxrError(f"{src}: cannot read ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CxrError(f"{src}: not a readable ONNX model ({e})") from None
    return read_metadata(props.get(METADATA_KEY), src)


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The checked metadata document of an ONNX artifact (see read_onnx_info)."""
    return read_onnx_info(path).meta
