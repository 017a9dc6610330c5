"""The consolidated checkpoint: one .safetensors file that rebuilds the model alone.

Tensors: `ema.<unet key>` and `online.<unet key>` (U-Net weights only, fp32).
Metadata: {"cxr_ddpm": <runtime.contract.metadata document, kind="checkpoint">} with the
full config, schedule, class names, step and provenance (package version, git
commit, data fingerprint). Readers prefer the EMA weights.

`load_checkpoint` is the one loader everything calls. It also reads lucidrains
Trainer checkpoints (`model-N.pt` with keys model/ema/step; their Unet args come
from a config the user supplies) and refuses anything else with one clear line.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config, DiffusionConfig, config_from_metadata
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.fsutil import atomic_path, file_sha256
from cxr_ddpm.runtime.contract.artifact import read_safetensors_info
from cxr_ddpm.runtime.contract.metadata import METADATA_KEY, build_metadata, dumps
from cxr_ddpm.runtime.sampling.schedule import Schedule

from .model import build_unet

CKPT_DIR = "checkpoints"                     # inside a run folder
CKPT_NAME = "step_{step:08d}.safetensors"
_CKPT_RE = re.compile(r"step_(\d+)\.safetensors$")


@dataclass
class Checkpoint:
    cfg: Config
    ema: dict[str, torch.Tensor] | None      # U-Net state dicts
    online: dict[str, torch.Tensor] | None
    step: int
    class_names: list[str]
    meta: dict[str, Any]
    path: Path
    sha256: str | None = None

    def weights(self, ema: bool = True) -> dict[str, torch.Tensor]:
        """EMA weights by default (what samples come from); online when asked or when no EMA."""
        chosen = self.ema if (ema and self.ema is not None) else self.online
        if chosen is None:
            raise CxrError(f"{self.path}: checkpoint holds no {'EMA' if ema else 'online'} weights")
        return chosen

    def build_unet(self, ema: bool = True) -> torch.nn.Module:
        unet = build_unet(self.cfg.model)
        try:
            unet.load_state_dict(self.weights(ema), strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
            raise CxrError(f"{self.path}: weights do not fit the model its config describes ({first})") from None
        return unet.eval()


def save_checkpoint(path: str | Path, *, cfg: Config, step: int, class_names: list[str],
                    ema: dict[str, torch.Tensor] | None, online: dict[str, torch.Tensor] | None,
                    data_fingerprint: str | None = None, **provenance_extra: Any) -> Path:
    """Write atomically (temp + rename): a crash mid-write never leaves a readable half file."""
    from safetensors.torch import save_file
    tensors: dict[str, torch.Tensor] = {}
    for prefix, sd in (("ema", ema), ("online", online)):
        for k, v in (sd or {}).items():
            tensors[f"{prefix}.{k}"] = v.detach().to("cpu", torch.float32).contiguous().clone()
    if not tensors:
        raise ValueError("save_checkpoint needs ema or online weights")
    meta = build_metadata(cfg, kind="checkpoint", class_names=class_names, step=int(step),
                          weights=[p for p, sd in (("ema", ema), ("online", online)) if sd],
                          provenance_extra={"data_fingerprint": data_fingerprint, **provenance_extra})
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: dumps(meta)})
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Newest consolidated checkpoint of a run folder (every one on disk is complete: atomic writes)."""
    found = []
    for p in (run_dir / CKPT_DIR).glob("step_*.safetensors"):
        m = _CKPT_RE.search(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A file, or a run folder (-> its newest consolidated checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CxrError(f"{path}: checkpoint not found")
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CxrError(f"{path}: run folder holds no consolidated checkpoint in {CKPT_DIR}/")
        return found
    return path


def load_checkpoint(path: str | Path, config: Config | None = None, *,
                    derive_diffusion: bool = False) -> Checkpoint:
    """Read a cxr-ddpm .safetensors checkpoint (or run folder), or a lucidrains model-N.pt.

    `config` is required for lucidrains files (they carry no config). Their schedule
    buffers and loss weights still tell T, the schedule and the objective: every field
    derivable from them must agree with the config (else one line names it), and with
    `derive_diffusion` (the config file has no diffusion section) they replace it.
    For our own files `config` is optional and, when given, must describe the same
    model and schedule.
    """
    path = resolve_checkpoint(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors":
        ckpt = _load_safetensors(path)
        if config is not None:                 # our files carry their config: the given one must agree
            check_same_model(ckpt.cfg.to_dict(), config.to_dict(), str(path))
    elif head.startswith(b"PK") or path.suffix in (".pt", ".pth", ".ckpt"):
        ckpt = _load_lucidrains(path, config, derive_diffusion)
    else:
        raise CxrError(f"{path}: unknown checkpoint format (expected a cxr-ddpm .safetensors "
                       f"or a lucidrains Trainer model-N.pt)")
    return ckpt


def checkpoint_config(path: Path) -> Config:
    """The config a cxr-ddpm .safetensors checkpoint records, read from its header alone."""
    return config_from_metadata(read_safetensors_info(path).meta, str(path))


def _load_safetensors(path: Path) -> Checkpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    meta = read_safetensors_info(path).meta          # the header first: one line for a non-checkpoint
    cfg = config_from_metadata(meta, str(path))
    try:
        tensors = load_file(str(path))
    except (SafetensorError, ValueError, OSError) as e:
        raise CxrError(f"{path}: corrupt or truncated safetensors file ({' '.join(str(e).split())[:120]})") from None
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    online = {k[7:]: v for k, v in tensors.items() if k.startswith("online.")}
    return Checkpoint(cfg, ema or None, online or None, int(meta.get("step", 0)),
                      list(meta["class_names"]), meta, path, file_sha256(path))


def _load_lucidrains(path: Path, config: Config | None, derive_diffusion: bool = False) -> Checkpoint:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CxrError(f"{path}: cannot read as a torch checkpoint ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(data, dict) or "model" not in data or not isinstance(data["model"], dict):
        keys = ", ".join(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise CxrError(f"{path}: unknown checkpoint format (not a lucidrains Trainer checkpoint: "
                       f"expected keys model, ema, step; found {keys})")
    if config is None:
        raise CxrError(f"{path}: lucidrains checkpoints carry no model config; pass --config FILE")
    config = check_lucidrains_diffusion(data["model"], config, path, derive=derive_diffusion)
    # GaussianDiffusion state: U-Net under "model."; EMA wraps it again under "ema_model.model."
    online = {k[6:]: v for k, v in data["model"].items() if k.startswith("model.")}
    ema_sd = data.get("ema") or {}
    ema = {k[16:]: v for k, v in ema_sd.items() if k.startswith("ema_model.model.")}
    if not online:
        raise CxrError(f"{path}: 'model' holds no U-Net weights (no 'model.' keys)")
    meta = build_metadata(config, kind="checkpoint", class_names=[], step=int(data.get("step", 0)),
                          provenance_extra={"imported_from": "lucidrains",
                                            "lucidrains_version": data.get("version")})
    return Checkpoint(config, ema or None, online, int(data.get("step", 0)), [], meta, path, file_sha256(path))


def lucidrains_diffusion(state: dict[str, Any], like: DiffusionConfig) -> dict[str, Any]:
    """What a lucidrains GaussianDiffusion state dict says about its diffusion config:
    timesteps (length of `betas`), beta_schedule (which of ours rebuilds `betas`, with the
    parameters of `like`), objective and min-SNR weighting (which of lucidrains' loss-weight
    rules gives `loss_weight`). A field that cannot be told is left out."""
    betas = state.get("betas")
    if betas is None:
        return {}
    betas = betas.double().cpu().numpy()
    found: dict[str, Any] = {"timesteps": int(betas.shape[0])}
    for name in ("sigmoid", "cosine", "linear"):
        cand = Schedule.from_config(dataclasses.replace(like, timesteps=len(betas), beta_schedule=name)).betas
        if np.allclose(cand, betas, rtol=0, atol=1e-6):
            found["beta_schedule"] = name
            break
    weight = state.get("loss_weight")
    if weight is not None:
        ac = state["alphas_cumprod"].double().cpu().numpy()
        snr = ac / (1 - ac)
        for min_snr in (like.min_snr_loss_weight, not like.min_snr_loss_weight):
            clipped = np.minimum(snr, like.min_snr_gamma) if min_snr else snr
            rules = {"pred_noise": clipped / snr, "pred_x0": clipped, "pred_v": clipped / (snr + 1)}
            hit = [k for k, w in rules.items() if np.allclose(w, weight.double().cpu().numpy(), rtol=1e-4)]
            if len(hit) == 1:
                found.update(objective=hit[0], min_snr_loss_weight=min_snr)
                break
    return found


def check_lucidrains_diffusion(state: dict[str, Any], config: Config, path: Path, *, derive: bool) -> Config:
    """Refuse a config whose diffusion section contradicts the checkpoint's own buffers (an ONNX
    exported that way samples wrong images); with `derive`, take the section from them."""
    found = lucidrains_diffusion(state, config.diffusion)
    if derive:
        if "beta_schedule" not in found or "objective" not in found:
            raise CxrError(f"{path}: cannot tell the diffusion schedule/objective from its buffers; "
                           "add a diffusion: section to the config")
        return config.replace(diffusion=dataclasses.replace(config.diffusion, **found))
    have = dataclasses.asdict(config.diffusion)
    for key, value in found.items():
        if have[key] != value:
            raise CxrError(f"{path}: checkpoint has diffusion.{key}={value!r} but the config says "
                           f"diffusion.{key}={have[key]!r}; fix the config (or drop its diffusion: "
                           "section to take it from the checkpoint)")
    if "beta_schedule" not in found and "betas" in state:
        raise CxrError(f"{path}: the checkpoint's betas are not the config's diffusion.beta_schedule="
                       f"{config.diffusion.beta_schedule!r} schedule with these parameters")
    return config


def check_same_model(have: dict[str, Any], want: dict[str, Any], source: str, hint: str = "") -> None:
    """The weights' config `have` (Config.to_dict() form) against the requested `want`: CxrError naming
    the first model/diffusion key that differs (then `hint`); the other sections may differ."""
    for section in ("model", "diffusion"):
        a = have.get(section) or {}
        for key, value in want[section].items():
            if a.get(key) != value:
                raise CxrError(f"{source}: checkpoint's {section}.{key}={a.get(key)!r} does not "
                               f"match the requested {section}.{key}={value!r}{hint}")
