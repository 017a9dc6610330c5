"""Training's config schema: all four sections (model, diffusion, data, train), files, `--set`.

Typed, frozen dataclasses; model and diffusion are the runtime's (`cxr_ddpm.runtime.contract.config`,
part of the artifact contract), data and train are training's own and reach artifacts only
as provenance. Files in `configs/` (YAML, TOML or JSON) hold only the values that differ from
the defaults; `--set section.key=value` overrides them on the command line. Unknown keys and
wrong types are errors that name the file (or the flag) and the key: training validates its
whole config strictly, the runtime reading an artifact does not. Torch-free.

    cfg = load_config("configs/tiny.yaml", ["train.steps=100"])
    cfg.model.dim, cfg.diffusion.objective, cfg.to_dict()
"""
from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cxr_ddpm.runtime.contract.config import (DiffusionConfig, ModelConfig, ModelSpec, build_section, field_types,
                                     parse_string, positive, sections_digest)
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.contract.metadata import training_sections

Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class DataConfig:
    root: str = "data/cxr-sample"                 # one folder per class, images inside
    hflip: bool = False                           # off: a chest X-ray is not left-right symmetric
    num_workers: int = -1                         # -1 = derive from the job's CPU allowance
    class_balanced: bool = False                  # sample classes equally (conditional training)

    def validate(self) -> None:
        if not self.root.strip():     # "" would mean the current directory, silently
            raise CxrError("data.root is empty: give the image folder (or leave data.root out for "
                           "the default data/cxr-sample)")
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
        positive("train", self, "steps", "micro_batch", "grad_accum", "keep_last", "log_every",
                  "num_samples", "sample_steps", "ema_every")
        for name in ("global_batch", "warmup_steps", "save_every", "sample_every"):
            if getattr(self, name) < 0:
                raise CxrError(f"train.{name} must be >= 0")
        if self.zero_stage not in (0, 1, 2, 3):
            raise CxrError(f"train.zero_stage={self.zero_stage} is not a ZeRO stage; use 0, 1, 2 or 3")
        if self.lr <= 0:
            raise CxrError(f"train.lr must be > 0, got {self.lr}")
        if self.grad_clip < 0:
            raise CxrError(f"train.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise CxrError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")


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
        return sections_digest(self.to_dict())

    @property
    def spec(self) -> ModelSpec:
        """The contract sections (what an artifact's runtime reads)."""
        return ModelSpec(self.model, self.diffusion)

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config",
                  set_by: dict[str, str] | None = None) -> "Config":
        """Build from nested dicts; unknown keys and wrong types raise CxrError naming them.
        set_by maps "section.key" to the `--set` that gave its value: an error about such a key
        names that flag, not the file."""
        set_by = set_by or {}
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
            kwargs[name] = build_section(section_cls, name, values, source, set_by=set_by)
        cfg = cls(**kwargs)
        try:
            for section in (cfg.model, cfg.diffusion, cfg.data, cfg.train):
                section.validate()
            cfg._validate_across_sections()
        except CxrError as e:
            raise CxrError(f"{_blame(str(e), source, set_by)}: {e}") from None
        return cfg


    def _validate_across_sections(self) -> None:
        m, d = self.model, self.diffusion
        if m.num_classes and (d.beta_schedule == "sigmoid" or d.cosine_s != 0.008):
            # lucidrains' classifier-free-guidance GaussianDiffusion only builds these two
            raise CxrError("model.num_classes > 0 needs diffusion.beta_schedule linear or cosine "
                           "(with the default cosine_s): add --set diffusion.beta_schedule=cosine")


_SECTIONS: dict[str, type] = {"model": ModelConfig, "diffusion": DiffusionConfig,
                              "data": DataConfig, "train": TrainConfig}
_KEY_RE = re.compile(r"\b(?:model|diffusion|data|train)\.[a-z_]+")


def _blame(message: str, source: str, set_by: dict[str, str]) -> str:
    """Who a validation message is about: the first key it names that a --set gave (then that
    flag, `--set train.lr=-1`), else the file. Every validate() message names its keys."""
    return next((set_by[k] for k in _KEY_RE.findall(message) if k in set_by), source)


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
    set_by = {item.partition("=")[0].strip(): f"--set {item.strip()}" for item in overrides}
    return Config.from_dict(raw, source, set_by)


def load_checkpoint_config(path: str | Path) -> tuple[Config, bool]:
    """The --config of a lucidrains checkpoint: (config, whether its file has no diffusion
    section, so that section is to be taken from the checkpoint's own buffers)."""
    return load_config(path), "diffusion" not in read_config_file(Path(path))


def read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CxrError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CxrError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                       "save the file as UTF-8") from None
    except OSError as e:
        raise CxrError(f"{path}: cannot read: {e.strerror or e}") from None
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
        ftype = field_types(_SECTIONS[section]).get(name)
        if ftype is None:
            raise CxrError(f"--set {key}: unknown key '{name}' in section '{section}' "
                           f"(valid: {', '.join(field_types(_SECTIONS[section]))})")
        out.setdefault(section, {})[name] = parse_string(value.strip(), ftype, f"--set {key}")
    return out


def config_from_metadata(meta: dict[str, Any], source: str) -> Config:
    """The full training config an artifact was made with, validated strictly (training's rule):
    its contract sections plus the data/train provenance (either document layout)."""
    contract = meta.get("config")
    contract = {k: v for k, v in contract.items() if k in ("model", "diffusion")} if isinstance(contract, dict) else {}
    raw = {**training_sections(meta), **contract}
    return Config.from_dict(raw, f"{source} (embedded config)")
