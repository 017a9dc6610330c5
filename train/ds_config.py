"""The DeepSpeed config of a run: configs/deepspeed/zero{1,2,3}.json + cfg.train.

The JSON files hold what a cluster user tunes per ZeRO stage (bucket sizes,
overlap, optimizer betas). Everything the run config already states is filled
in from `cfg.train` so the two can never disagree: batch sizes, lr, weight
decay, warmup, gradient clipping, and precision (bf16/fp16 `enabled` is a field
toggled from train.precision; there is one file per stage, not one per dtype).
`train.zero_stage=0` (plain data parallel, the DDP baseline) reuses zero1.json
with ZeRO switched off.

All checks here run before any process group starts, so a bad config is one
clear line on every rank instead of a hang or a traceback.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from cxr_ddpm.runtime.config import Config
from cxr_ddpm.runtime.errors import CxrError

DS_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"


def check_batch(cfg: Config, world_size: int) -> int:
    """Global batch = micro x grad-accum x world; returns it or raises naming all four."""
    t = cfg.train
    derived = t.micro_batch * t.grad_accum * world_size
    if t.global_batch and t.global_batch != derived:
        raise CxrError(
            f"train.global_batch={t.global_batch} does not equal train.micro_batch={t.micro_batch} x "
            f"train.grad_accum={t.grad_accum} x world size {world_size} = {derived}; "
            f"set train.global_batch=0 (derive it) or change one of the others")
    return derived


def check_precision(precision: str, cuda: bool) -> None:
    if precision == "fp16" and not cuda:
        raise CxrError("train.precision=fp16 needs a CUDA GPU (DeepSpeed refuses fp16 on CPU); "
                       "use bf16 or fp32")


def load_stage_file(stage: int, config_dir: Path = DS_CONFIG_DIR) -> dict[str, Any]:
    if stage not in (0, 1, 2, 3):
        raise CxrError(f"train.zero_stage={stage} is not a ZeRO stage; use 0, 1, 2 or 3")
    path = config_dir / f"zero{max(stage, 1)}.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CxrError(f"{path}: DeepSpeed config not found") from None
    except json.JSONDecodeError as e:
        raise CxrError(f"{path}: cannot parse: {e}") from None
    file_stage = raw.get("zero_optimization", {}).get("stage")
    if file_stage != max(stage, 1):
        raise CxrError(f"{path}: zero_optimization.stage={file_stage!r} does not match the file name")
    if file_stage in (1, 2) and raw["zero_optimization"].get("contiguous_gradients") is False:
        # Seen on CPU: ZeRO-1/2 skipped the gradient all-reduce with contiguous_gradients
        # and reduce_scatter both off, and the ranks silently drifted apart.
        raise CxrError(f"{path}: keep zero_optimization.contiguous_gradients true")
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def build_ds_config(cfg: Config, world_size: int, cuda: bool,
                    config_dir: Path = DS_CONFIG_DIR) -> dict[str, Any]:
    """The dict passed to deepspeed.initialize(config=...)."""
    t = cfg.train
    global_batch = check_batch(cfg, world_size)
    check_precision(t.precision, cuda)
    ds = copy.deepcopy(load_stage_file(t.zero_stage, config_dir))
    if t.zero_stage == 0:
        ds["zero_optimization"] = {"stage": 0}
    ds["train_batch_size"] = global_batch
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch
    ds["gradient_accumulation_steps"] = t.grad_accum
    ds["gradient_clipping"] = t.grad_clip                  # 0 disables clipping in DeepSpeed too
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    opt.setdefault("params", {}).update(lr=t.lr, weight_decay=t.weight_decay)
    if not cuda:
        opt["params"]["torch_adam"] = True                 # no JIT build of DeepSpeed's CPU Adam
    sched = ds.setdefault("scheduler", {"type": "WarmupLR", "params": {}})
    sched.setdefault("params", {}).update(warmup_max_lr=t.lr, warmup_num_steps=max(t.warmup_steps, 1))
    sched["params"].setdefault("warmup_min_lr", 0.0)
    # bf16: DeepSpeed keeps bf16 parameters with fp32 master weights in the optimizer;
    # the U-Net forward then runs under autocast inside `loop.AutocastUnet`.
    ds.setdefault("bf16", {})["enabled"] = t.precision == "bf16"
    ds.setdefault("fp16", {})["enabled"] = t.precision == "fp16"
    ds.setdefault("steps_per_print", 10**9)                # our own log, not DeepSpeed's
    return ds
