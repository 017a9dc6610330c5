"""The DeepSpeed config of a run: per-stage defaults built here + cfg.train.

`stage_defaults(stage)` holds what a cluster user tunes per ZeRO stage (bucket
sizes, overlap, optimizer betas). It is code, not a file beside the package, so an
installed wheel trains as a source checkout does; `configs/deepspeed/zero{1,2,3}.json`
are the same dicts written out as documented examples (a test keeps them equal).
To tune them, copy one and pass it: `--set train.deepspeed_config=my_zero2.json`.
Everything the run config already states is filled in from `cfg.train` so the two
can never disagree: batch sizes, lr, weight decay, warmup, gradient clipping, and
precision (bf16/fp16 `enabled` follows train.precision). `train.zero_stage=0`
(plain data parallel, the DDP baseline) uses the ZeRO-1 dict with ZeRO switched off.

All checks here run before any process group starts, so a bad config is one
clear line on every rank instead of a hang or a traceback.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from .config import Config
from cxr_ddpm.runtime.errors import CxrError

_COMMENT = ("ZeRO-{stage}. cxr-train fills train_batch_size, train_micro_batch_size_per_gpu, "
            "gradient_accumulation_steps, optimizer lr/weight_decay, scheduler warmup, gradient_clipping "
            "and bf16/fp16 'enabled' from the run config (train.*); edit ZeRO/communication settings here "
            "and pass the file with --set train.deepspeed_config=FILE. contiguous_gradients must stay "
            "true on CPU (see docs).")


def stage_defaults(stage: int) -> dict[str, Any]:
    """The built-in DeepSpeed dict of ZeRO stage 1, 2 or 3 (before cfg.train is filled in)."""
    if stage not in (1, 2, 3):
        raise ValueError(f"no ZeRO stage {stage}")     # TrainConfig.validate refuses it first
    zero: dict[str, Any] = {"stage": stage, "contiguous_gradients": True, "overlap_comm": False}
    if stage < 3:
        zero.update(reduce_scatter=True, reduce_bucket_size=50_000_000, allgather_bucket_size=50_000_000)
    else:   # ZeRO-3 gathers parameters per layer: smaller prefetch, small params stay resident
        zero.update(reduce_bucket_size=50_000_000, stage3_prefetch_bucket_size=5_000_000,
                    stage3_param_persistence_threshold=10_000,
                    stage3_gather_16bit_weights_on_model_save=False)
    return {
        "_comment": _COMMENT.format(stage=stage),
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.999], "eps": 1e-08, "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_type": "linear"}},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False, "initial_scale_power": 16},
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }


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


def load_stage_file(path: str | Path, stage: int) -> dict[str, Any]:
    """A user's DeepSpeed JSON (train.deepspeed_config) for ZeRO `stage`, checked."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CxrError(f"train.deepspeed_config={path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CxrError(f"train.deepspeed_config={path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise CxrError(f"train.deepspeed_config={path}: cannot parse: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("zero_optimization"), dict):
        raise CxrError(f"train.deepspeed_config={path}: needs a zero_optimization section")
    file_stage = raw["zero_optimization"].get("stage")
    if file_stage != max(stage, 1):
        raise CxrError(f"train.deepspeed_config={path}: zero_optimization.stage={file_stage!r} does not "
                       f"match train.zero_stage={stage}")
    return raw


def check_stage_dict(ds: dict[str, Any], source: str) -> None:
    zero = ds["zero_optimization"]
    if zero.get("stage") in (1, 2) and zero.get("contiguous_gradients") is False:
        # Seen on CPU: ZeRO-1/2 skipped the gradient all-reduce with contiguous_gradients
        # and reduce_scatter both off, and the ranks silently drifted apart.
        raise CxrError(f"{source}: keep zero_optimization.contiguous_gradients true")


def build_ds_config(cfg: Config, world_size: int, cuda: bool) -> dict[str, Any]:
    """The dict passed to deepspeed.initialize(config=...)."""
    t = cfg.train
    global_batch = check_batch(cfg, world_size)
    check_precision(t.precision, cuda)
    if t.deepspeed_config:
        ds = load_stage_file(t.deepspeed_config, t.zero_stage)
        check_stage_dict(ds, f"train.deepspeed_config={t.deepspeed_config}")
    else:
        ds = stage_defaults(max(t.zero_stage, 1))
    ds = {k: copy.deepcopy(v) for k, v in ds.items() if not k.startswith("_")}
    if t.zero_stage == 0:
        ds["zero_optimization"] = {"stage": 0}
    ds["train_batch_size"] = global_batch
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch
    ds["gradient_accumulation_steps"] = t.grad_accum
    ds["gradient_clipping"] = t.grad_clip                  # 0 disables clipping in DeepSpeed too
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    opt.setdefault("params", {}).update(lr=t.lr, weight_decay=t.weight_decay)
    # torch's AdamW through DeepSpeed's torch_adam path: no JIT build of DeepSpeed's own Adam
    # ops; on CUDA its fused kernel (one launch for all parameters instead of one per tensor)
    opt["params"]["torch_adam"] = True
    if cuda:
        opt["params"]["fused"] = True
    sched = ds.setdefault("scheduler", {"type": "WarmupLR", "params": {}})
    sched.setdefault("params", {}).update(warmup_max_lr=t.lr, warmup_num_steps=max(t.warmup_steps, 1))
    sched["params"].setdefault("warmup_min_lr", 0.0)
    # bf16: DeepSpeed keeps bf16 parameters with fp32 master weights in the optimizer;
    # the U-Net forward then runs under autocast inside `engine.AutocastUnet`.
    ds.setdefault("bf16", {})["enabled"] = t.precision == "bf16"
    ds.setdefault("fp16", {})["enabled"] = t.precision == "fp16"
    ds.setdefault("steps_per_print", 10**9)                # our own log, not DeepSpeed's
    return ds
