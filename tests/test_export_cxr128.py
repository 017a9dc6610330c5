"""The cxr128 architecture (untrained, freshly initialised) exports and verifies once."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cxr_ddpm.export.onnx_export import export_onnx
from cxr_ddpm.train.config import load_config
from cxr_ddpm.runtime.contract.metadata import read_onnx_metadata
from cxr_ddpm.train.checkpoint import save_checkpoint
from cxr_ddpm.train.model import build_unet

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cxr128_exports_and_verifies(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "cxr128.yaml")
    torch.manual_seed(0)
    sd = build_unet(cfg.model).state_dict()
    ckpt = save_checkpoint(tmp_path / "cxr128.safetensors", cfg=cfg, step=0, class_names=["COVID-19", "Normal"],
                           ema=sd, online=sd)
    res = export_onnx(ckpt, tmp_path / "cxr128.onnx", verify_batches=(1,))
    assert res.exporter == "dynamo" and res.report.ok, res.report.table()
    meta = read_onnx_metadata(res.path)
    assert meta["io"]["inputs"][0]["shape"] == ["B", 1, 128, 128] and meta["config"]["model"]["flash_attn"] is True
