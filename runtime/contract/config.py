"""The runtime's config sections: what sampling an artifact needs (model, diffusion).

These two typed, frozen sections are part of the artifact contract (runtime/contract/metadata.py,
docs/artifact-contract.schema.json, README "The artifact contract"): every artifact carries them
and every runtime reads them, so a change to them is a contract change (minor: a key added with
a default; major: anything an older runtime would misread). Training's own sections (data,
train), config files and `--set` live in `cxr_ddpm.train.config`; artifacts carry those as
provenance, which the runtime shows (`cxr-runtime inspect`) but never validates.

    spec = ModelSpec.from_dict(doc["config"], "model.onnx")
    spec.model.image_size, spec.diffusion.objective, spec.digest()
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import CxrError

Objective = Literal["pred_noise", "pred_x0", "pred_v"]
BetaSchedule = Literal["linear", "cosine", "sigmoid"]


# -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    dim: int = 64                                 # base channel width of the U-Net
    dim_mults: tuple[int, ...] = (1, 2, 4, 8)     # width multiplier per resolution level
    channels: int = 1                             # radiographs are single-channel
    image_size: int = 128                         # square side in pixels
    self_condition: bool = False                  # feed the previous x0 estimate back in
    flash_attn: bool = False                      # torch SDPA in the full-attention layers
    attn_dim_head: int = 32
    attn_heads: int = 4
    dropout: float = 0.0
    num_classes: int = 0                          # 0 = unconditional; >0 = class-conditional
    cond_drop_prob: float = 0.1                   # label dropout for classifier-free guidance

    def validate(self) -> None:
        positive("model", self, "dim", "channels", "image_size", "attn_dim_head", "attn_heads")
        if not self.dim_mults or any(m <= 0 for m in self.dim_mults):
            raise CxrError("model.dim_mults must be a non-empty list of positive ints")
        factor = 2 ** (len(self.dim_mults) - 1)
        if self.image_size % factor:
            raise CxrError(f"model.image_size={self.image_size} must be divisible by {factor} "
                           f"(2 ** (len(dim_mults) - 1)) so the U-Net's skips line up")
        if self.num_classes < 0:
            raise CxrError("model.num_classes must be >= 0")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise CxrError("model.cond_drop_prob must be in [0, 1)")


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = 1000                         # T, the number of training noise levels
    objective: Objective = "pred_v"               # what the U-Net predicts
    beta_schedule: BetaSchedule = "sigmoid"       # https://arxiv.org/abs/2212.11972 for sigmoid
    cosine_s: float = 0.008                       # offset of the cosine schedule (Nichol & Dhariwal)
    sigmoid_start: float = -3.0
    sigmoid_end: float = 3.0
    sigmoid_tau: float = 1.0
    min_snr_loss_weight: bool = False             # https://arxiv.org/abs/2303.09556
    min_snr_gamma: float = 5.0
    offset_noise_strength: float = 0.0            # https://www.crosslabs.org/blog/diffusion-with-offset-noise

    def validate(self) -> None:
        positive("diffusion", self, "timesteps")
        if self.sigmoid_tau <= 0:
            raise CxrError("diffusion.sigmoid_tau must be > 0")
        if self.sigmoid_end <= self.sigmoid_start:
            raise CxrError("diffusion.sigmoid_end must be greater than diffusion.sigmoid_start")



@dataclass(frozen=True)
class ModelSpec:
    """The contract sections of an artifact's config: the U-Net's shape and the diffusion process.
    Training's `Config` has the same two attributes, so code that reads only these takes either."""
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists

    def digest(self) -> str:
        """Short hash of the model + diffusion sections: what a checkpoint's weights depend on."""
        return sections_digest(self.to_dict())

    @classmethod
    def from_dict(cls, raw: Any, source: str, *, ignore_unknown: bool = False) -> "ModelSpec":
        """Both sections from an artifact's `config`; unknown keys are refused (they would be a
        contract change this runtime does not know) unless ignore_unknown (a newer minor version,
        whose additions an older reader may skip by the contract's rule)."""
        if not isinstance(raw, dict):
            raise CxrError(f"{source}: 'config' must be a mapping of sections")
        for name in ("model", "diffusion"):
            if not isinstance(raw.get(name), dict):
                raise CxrError(f"{source}: 'config' lacks the '{name}' section" if name not in raw
                               else f"{source}: '{name}' must be a mapping of keys")
        spec = cls(build_section(ModelConfig, "model", raw["model"], source, ignore_unknown=ignore_unknown),
                   build_section(DiffusionConfig, "diffusion", raw["diffusion"], source,
                                 ignore_unknown=ignore_unknown))
        try:
            spec.model.validate()
            spec.diffusion.validate()
        except CxrError as e:
            raise CxrError(f"{source}: {e}") from None
        return spec


def sections_digest(sections: dict[str, Any]) -> str:
    """The digest of the model and diffusion sections of a `to_dict()` (ModelSpec or Config)."""
    blob = json.dumps({"model": sections["model"], "diffusion": sections["diffusion"]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -----------------------------------------------------------------------------
# typing helpers: coerce and check values against the dataclass annotations

def field_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def build_section(section_cls: type, name: str, values: dict[str, Any], source: str, *,
                  set_by: dict[str, str] | None = None, ignore_unknown: bool = False) -> Any:
    """One section from its mapping, each value checked against its annotation. set_by: keys a
    `--set` gave (their errors name the flag); ignore_unknown: skip keys the schema lacks."""
    types_ = field_types(section_cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types_:
            if ignore_unknown:
                continue
            raise CxrError(f"{source}: unknown key '{name}.{key}' (valid: {', '.join(types_)})")
        where = f"--set {name}.{key}" if f"{name}.{key}" in (set_by or {}) else f"{source}: {name}.{key}"
        kwargs[key] = check_value(value, types_[key], where)
    return section_cls(**kwargs)


def check_value(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(map(str, typing.get_args(tp)))
            raise CxrError(f"{where} must be one of {choices}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise CxrError(f"{where} must be a list of ints, got {value!r}")
        return tuple(check_value(v, typing.get_args(tp)[0], where) for v in value)
    if origin in (typing.Union, types.UnionType):
        return value if value is None else check_value(value, typing.get_args(tp)[0], where)
    if tp is bool:
        if not isinstance(value, bool):
            raise CxrError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise CxrError(f"{where} must be an int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CxrError(f"{where} must be a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:          # an int beyond the float range
            number = math.inf
        if not math.isfinite(number):  # nan slips through every `<=` range check
            raise CxrError(f"{where} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise CxrError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp}")  # a schema bug, not a user error


def parse_string(text: str, tp: Any, where: str) -> Any:
    """Turn an override string into the schema's type (then check_value validates it)."""
    origin = typing.get_origin(tp)
    try:
        if origin is tuple:
            parts = [p for p in text.strip("[]()").replace(" ", "").split(",") if p]
            return tuple(int(p) for p in parts)
        if tp is bool:
            low = text.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
    except ValueError:
        kind = {bool: "true or false", int: "an int", float: "a number"}.get(tp, "a list of ints")
        raise CxrError(f"{where} must be {kind}, got {text!r}") from None
    return text


def positive(prefix: str, section: Any, *names: str) -> None:
    """CxrError naming `prefix.name` for the first of `names` that is not > 0."""
    for name in names:
        if getattr(section, name) <= 0:
            raise CxrError(f"{prefix}.{name} must be > 0, got {getattr(section, name)}")

