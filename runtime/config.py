"""The one config schema shared by training, export and sampling.

Typed, frozen dataclasses in four sections (model, diffusion, data, train).
Files in `configs/` (YAML or TOML) hold only the values that differ from the
defaults below; `--set section.key=value` overrides them on the command line.
Unknown keys and wrong types are errors that name the file and the key.

    cfg = load_config("configs/tiny.yaml", ["train.steps=100"])
    cfg.model.dim, cfg.diffusion.objective, cfg.to_dict()
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import CxrError

Objective = Literal["pred_noise", "pred_x0", "pred_v"]
BetaSchedule = Literal["linear", "cosine", "sigmoid"]
Precision = Literal["fp32", "bf16", "fp16"]


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
        _positive(self, "dim", "channels", "image_size", "attn_dim_head", "attn_heads")
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
        _positive(self, "timesteps")
        if self.sigmoid_tau <= 0:
            raise CxrError("diffusion.sigmoid_tau must be > 0")
        if self.sigmoid_end <= self.sigmoid_start:
            raise CxrError("diffusion.sigmoid_end must be greater than diffusion.sigmoid_start")


@dataclass(frozen=True)
class DataConfig:
    root: str = "data/cxr-sample"                 # one folder per class, images inside
    hflip: bool = False                           # off: a chest X-ray is not left-right symmetric
    num_workers: int = -1                         # -1 = derive from the job's CPU allowance
    class_balanced: bool = False                  # sample classes equally (conditional training)

    def validate(self) -> None:
        if self.num_workers < -1:
            raise CxrError("data.num_workers must be -1 (auto) or >= 0")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000                             # optimizer steps in total
    micro_batch: int = 8                          # images per rank per forward/backward
    grad_accum: int = 1                           # micro-batches per optimizer step
    global_batch: int = 0                         # 0 = micro_batch * grad_accum * world_size
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100                       # linear LR warmup from 0
    grad_clip: float = 1.0                        # max global grad norm; 0 disables
    ema_decay: float = 0.995
    ema_every: int = 1                            # steps between EMA updates (lucidrains: 10)
    seed: int = 0
    zero_stage: int = 2                           # DeepSpeed ZeRO stage; 0 = plain data parallel
    deepspeed_config: str = ""                    # JSON with ZeRO/communication settings; "" = built in
    precision: Precision = "fp32"
    save_every: int = 500                         # steps between checkpoints
    keep_last: int = 3                            # DeepSpeed checkpoints kept on disk
    sample_every: int = 500                       # steps between EMA sample grids; 0 disables
    sample_steps: int = 50                        # DDIM steps for the sample grids
    num_samples: int = 16                         # images in a sample grid
    log_every: int = 10                           # steps between loss log lines
    channels_last: bool = False                   # NHWC input/activations (faster convolutions on GPUs)
    compile: bool = False                         # torch.compile the U-Net (graphs that fail run eager)
    tensorboard: bool = False                     # also write TensorBoard scalars + grids to RUN/tb

    def validate(self) -> None:
        _positive(self, "steps", "micro_batch", "grad_accum", "keep_last", "log_every",
                  "num_samples", "sample_steps", "ema_every")
        for name in ("global_batch", "warmup_steps", "save_every", "sample_every"):
            if getattr(self, name) < 0:
                raise CxrError(f"train.{name} must be >= 0")
        if self.zero_stage not in (0, 1, 2, 3):
            raise CxrError(f"train.zero_stage={self.zero_stage} is not a ZeRO stage; use 0, 1, 2 or 3")
        if self.lr <= 0 or self.grad_clip < 0 or not 0.0 <= self.ema_decay < 1.0:
            raise CxrError("train.lr must be > 0, train.grad_clip >= 0, train.ema_decay in [0, 1)")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists

    def digest(self) -> str:
        """Short hash of the model + diffusion sections: what a checkpoint's weights depend on."""
        d = self.to_dict()
        blob = json.dumps({"model": d["model"], "diffusion": d["diffusion"]}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "Config":
        """Build from nested dicts; unknown keys and wrong types raise CxrError naming them."""
        if not isinstance(raw, dict):
            raise CxrError(f"{source}: top level must be a mapping of sections")
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for name, values in raw.items():
            if name not in sections:
                raise CxrError(f"{source}: unknown section '{name}' (valid: {', '.join(sections)})")
            section_cls = _SECTIONS[name]
            if not isinstance(values, dict):
                raise CxrError(f"{source}: '{name}' must be a mapping of keys")
            kwargs[name] = _build_section(section_cls, name, values, source)
        cfg = cls(**kwargs)
        try:
            for section in (cfg.model, cfg.diffusion, cfg.data, cfg.train):
                section.validate()
            cfg._validate_across_sections()
        except CxrError as e:
            raise CxrError(f"{source}: {e}") from None
        return cfg


    def _validate_across_sections(self) -> None:
        m, d = self.model, self.diffusion
        if m.num_classes and (d.beta_schedule == "sigmoid" or d.cosine_s != 0.008):
            # lucidrains' classifier-free-guidance GaussianDiffusion only builds these two
            raise CxrError("model.num_classes > 0 needs diffusion.beta_schedule linear or cosine "
                           "(with the default cosine_s): add --set diffusion.beta_schedule=cosine")


_SECTIONS: dict[str, type] = {"model": ModelConfig, "diffusion": DiffusionConfig,
                              "data": DataConfig, "train": TrainConfig}


# -----------------------------------------------------------------------------
# loading and overrides

def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a YAML/TOML config (or the defaults when path is None), then apply `key=value` overrides."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        raw = read_config_file(path)
    raw = apply_overrides(raw, overrides)
    return Config.from_dict(raw, source)


def load_checkpoint_config(path: str | Path) -> tuple[Config, bool]:
    """The --config of a lucidrains checkpoint: (config, whether its file has no diffusion
    section, so that section is to be taken from the checkpoint's own buffers)."""
    return load_config(path), "diffusion" not in read_config_file(Path(path))


def read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CxrError(f"{path}: config file not found")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml  # light dependency, only needed for YAML files
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise CxrError(f"{path}: unsupported config format (use .yaml, .toml or .json)")
    except CxrError:
        raise
    except Exception as e:  # parser errors carry line numbers; keep them on one line
        msg = " ".join(str(e).split())
        raise CxrError(f"{path}: cannot parse: {msg}") from None
    if not isinstance(data, dict):
        raise CxrError(f"{path}: top level must be a mapping of sections")
    return data


def apply_overrides(raw: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Return a copy of raw with each `section.key=value` applied (value typed by the schema)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise CxrError(f"--set {item!r}: expected section.key=value")
        section, dot, name = key.strip().partition(".")
        if not dot or section not in _SECTIONS:
            raise CxrError(f"--set {item!r}: key must be section.key with section one of "
                           f"{', '.join(_SECTIONS)}")
        ftype = _field_types(_SECTIONS[section]).get(name)
        if ftype is None:
            raise CxrError(f"--set {key}: unknown key '{name}' in section '{section}' "
                           f"(valid: {', '.join(_field_types(_SECTIONS[section]))})")
        out.setdefault(section, {})[name] = _parse_string(value.strip(), ftype, f"--set {key}")
    return out


# -----------------------------------------------------------------------------
# typing helpers: coerce and check values against the dataclass annotations

def _field_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _build_section(section_cls: type, name: str, values: dict[str, Any], source: str) -> Any:
    types_ = _field_types(section_cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types_:
            raise CxrError(f"{source}: unknown key '{name}.{key}' (valid: {', '.join(types_)})")
        kwargs[key] = _check(value, types_[key], f"{source}: {name}.{key}")
    return section_cls(**kwargs)


def _check(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(map(str, typing.get_args(tp)))
            raise CxrError(f"{where} must be one of {choices}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise CxrError(f"{where} must be a list of ints, got {value!r}")
        return tuple(_check(v, typing.get_args(tp)[0], where) for v in value)
    if origin in (typing.Union, types.UnionType):
        return value if value is None else _check(value, typing.get_args(tp)[0], where)
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
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise CxrError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp}")  # a schema bug, not a user error


def _parse_string(text: str, tp: Any, where: str) -> Any:
    """Turn an override string into the schema's type (then _check validates it)."""
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


def _positive(section: Any, *names: str) -> None:
    prefix = {ModelConfig: "model", DiffusionConfig: "diffusion", TrainConfig: "train"}[type(section)]
    for name in names:
        if getattr(section, name) <= 0:
            raise CxrError(f"{prefix}.{name} must be > 0, got {getattr(section, name)}")
