"""An artifact opened once, into one typed object: every fact sampling needs, derived once.

    art = open_artifact("model.onnx")      # or a cxr-ddpm TensorRT engine, or a .safetensors checkpoint
    art.spec.model.image_size, art.schedule, art.io.input_names, art.class_names
    art.self_condition, art.null_class     # derived here, for every backend alike
    art.training["train"]                  # provenance: shown by `inspect`, never validated

Opening is cheap and torch-free for every kind: an ONNX model's top-level protobuf fields (the
graph is skipped), an engine's header, a checkpoint's safetensors header. Backends take an
Artifact and only turn named feeds into outputs (runtime/backends/denoiser.py). The document follows
the artifact contract (runtime/contract/metadata.py, docs/artifact-contract.schema.json).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ModelConfig, ModelSpec
from .engine_file import is_engine_file, read_engine_info
from ..errors import CxrError
from ..fsutil import file_sha256
from .interface import io_spec
from .metadata import (METADATA_KEY, ArtifactInfo, check_metadata, read_metadata, read_onnx_info,
                       training_sections, version_text)
from ..sampling.schedule import Schedule

KINDS = ("onnx", "tensorrt", "checkpoint")
LUCIDRAINS_SUFFIXES = (".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]          # "B" = the dynamic batch axis


@dataclass(frozen=True)
class IOSpec:
    """The denoiser's named inputs and outputs (runtime/contract/interface.py is the convention)."""
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        return {kind: [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in specs]
                for kind, specs in (("inputs", self.inputs), ("outputs", self.outputs))}

    @classmethod
    def for_model(cls, model: ModelConfig) -> "IOSpec":
        return cls.from_dict(io_spec(model), "io_spec")

    @classmethod
    def from_dict(cls, raw: Any, source: str) -> "IOSpec":
        try:
            parts = [tuple(TensorSpec(str(s["name"]), str(s["dtype"]), tuple(s["shape"])) for s in raw[kind])
                     for kind in ("inputs", "outputs")]
        except (KeyError, TypeError):
            raise CxrError(f"{source}: metadata 'io' must list inputs and outputs, each with "
                           f"name, dtype and shape") from None
        io = cls(*parts)
        if not {"x", "t"} <= set(io.input_names) or io.output_names != ("out",):
            raise CxrError(f"{source}: inputs {list(io.input_names)} / outputs {list(io.output_names)} do not "
                           f"follow the cxr-ddpm denoiser interface (x, t[, x_self_cond][, class] -> out)")
        return io


@dataclass(frozen=True, eq=False)
class Artifact:
    """One artifact's document, checked, with what every backend needs derived from it once."""
    path: Path
    kind: str                           # one of KINDS
    meta: dict[str, Any]                # the document as stored (sample records hash it)
    version: tuple[int, int]            # the contract's (major, minor)
    spec: ModelSpec                     # the contract sections: model, diffusion
    schedule: Schedule
    io: IOSpec
    class_names: tuple[str, ...]
    provenance: dict[str, Any]
    training: dict[str, Any]            # data/train settings as written: never validated
    precision: str | None               # ONNX / engine precision; None for checkpoints
    self_condition: bool                # the model takes its previous x0 estimate
    null_class: int | None              # the unconditional label (= num_classes); None: unconditional
    plan_offset: int | None = None      # engines: where the plan starts
    known_sha256: str | None = None     # when the opener has hashed the file already

    @functools.cached_property
    def sha256(self) -> str:
        """sha256 of the artifact file, read once, when a record first needs it."""
        return self.known_sha256 or file_sha256(self.path)

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.io.input_names

    @property
    def num_classes(self) -> int:
        return self.spec.model.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        m = self.spec.model
        return (m.channels, m.image_size, m.image_size)

    @property
    def version_text(self) -> str:
        return version_text(self.version)


def artifact_from_info(info: ArtifactInfo, path: str | Path, kind: str, *, plan_offset: int | None = None,
                       known_sha256: str | None = None) -> Artifact:
    """The Artifact of a checked document: io (the document's, else the one the model config
    implies), and from it self-conditioning and the null class; contradictions refused."""
    src, meta, m = str(path), info.meta, info.spec.model
    io = IOSpec.from_dict(meta["io"], src) if "io" in meta else IOSpec.for_model(m)
    names = io.input_names
    self_condition, conditional = "x_self_cond" in names, "class" in names
    if conditional != (m.num_classes > 0) or self_condition != (m.self_condition and not m.num_classes):
        raise CxrError(f"{src}: its inputs {list(names)} contradict its model config "
                       f"(num_classes {m.num_classes}, self_condition {m.self_condition})")
    null_class = m.num_classes if conditional else None
    for key, derived in (("null_class", null_class), ("self_condition", self_condition)):
        if meta.get(key) is not None and meta[key] != derived:
            raise CxrError(f"{src}: metadata {key}={meta[key]!r} contradicts its inputs and model config "
                           f"({key} {derived!r})")
    prov = meta.get("provenance")
    precision = meta.get("precision")
    return Artifact(Path(path), kind, meta, info.version, info.spec, info.schedule, io,
                    tuple(meta["class_names"]), dict(prov) if isinstance(prov, dict) else {},
                    training_sections(meta), precision if isinstance(precision, str) else None,
                    self_condition, null_class, plan_offset, known_sha256)


def artifact_from_document(meta: dict[str, Any], path: str | Path, kind: str, *,
                           known_sha256: str | None = None) -> Artifact:
    """The Artifact of a document already parsed (e.g. a checkpoint loaded by the torch side)."""
    return artifact_from_info(check_metadata(meta, str(path)), path, kind, known_sha256=known_sha256)


def read_safetensors_info(path: Path) -> ArtifactInfo:
    """The document of a .safetensors checkpoint, from its JSON header alone (no tensors, no torch):
    8 bytes little-endian length, then the header with `__metadata__`."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 100_000_000:
                raise ValueError("corrupt header length")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CxrError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CxrError(f"{path}: not a safetensors file ({' '.join(str(e).split())[:80]})") from None
    extra = header.get("__metadata__") if isinstance(header, dict) else None
    return read_metadata((extra or {}).get(METADATA_KEY) if isinstance(extra, dict) else None, str(path))


def detect_kind(path: Path) -> str:
    if is_engine_file(path):
        return "tensorrt"
    return "checkpoint" if path.suffix in (".safetensors", *LUCIDRAINS_SUFFIXES) else "onnx"


def open_artifact(path: str | Path, kind: str | None = None) -> Artifact:
    """Open an ONNX model, a cxr-ddpm TensorRT engine or a .safetensors checkpoint (kind: force
    one of KINDS instead of telling by content and suffix). One line for anything unusable.
    Run folders and lucidrains model-N.pt files need the torch side (--backend torch)."""
    path = Path(path)
    if not path.exists():
        raise CxrError(f"{path}: engine file not found")
    if path.is_dir():
        raise CxrError(f"{path}: is a folder, not an artifact file (a training run folder opens with "
                       f"--backend torch)")
    try:
        if path.stat().st_size == 0:
            raise CxrError(f"{path}: empty file (not an ONNX model, TensorRT engine or checkpoint)")
    except OSError as e:
        raise CxrError(f"{path}: cannot read ({e.strerror})") from None
    kind = kind or detect_kind(path)
    if kind not in KINDS:
        raise CxrError(f"{path}: unknown artifact kind {kind!r} (valid: {', '.join(KINDS)})")
    if kind == "tensorrt":
        info, offset = read_engine_info(path)
        return artifact_from_info(info, path, kind, plan_offset=offset)
    if kind == "checkpoint":
        if path.suffix != ".safetensors":
            raise CxrError(f"{path}: a lucidrains checkpoint carries no metadata; sample or inspect it with "
                           f"--backend torch --config FILE")
        return artifact_from_info(read_safetensors_info(path), path, kind)
    return artifact_from_info(read_onnx_info(path), path, kind)
