"""The device-side EMA: one fused lerp, same numbers as the per-tensor loop it replaced."""
from __future__ import annotations

import pytest
import torch

from cxr_ddpm.runtime.config import load_config
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.train.ema import EMA
from cxr_ddpm.train.model import build_unet


def _reference(shadow: dict, module: torch.nn.Module, decay: float, n: int) -> None:
    """The previous implementation: a Python loop of per-tensor lerps on CPU fp32 copies."""
    d = min(decay, (1 + n) / (10 + n))
    for name, value in module.state_dict().items():
        s = shadow[name]
        if s.is_floating_point():
            s.lerp_(value.detach().to(s.device, torch.float32), 1.0 - d)
        else:
            s.copy_(value)


def _perturb(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)


def test_fused_lerp_matches_per_tensor_loop(tiny_cfg):
    torch.manual_seed(0)
    unet = build_unet(tiny_cfg.model)
    ema = EMA(unet, decay=0.995, zero_stage=0)
    ref = {k: v.detach().to(torch.float32).clone() for k, v in unet.state_dict().items()}
    for n in range(5):
        _perturb(unet, n)
        ema.update(unet)
        _reference(ref, unet, 0.995, n)
    assert ema.updates == 5
    for k in ref:
        assert torch.equal(ema.shadow[k], ref[k]), k
    # and the shadow really moved away from the online weights (the test can fail)
    w = "init_conv.weight"
    assert not torch.equal(ema.shadow[w], unet.state_dict()[w])


def test_ema_every_updates_on_multiples_only(tiny_cfg):
    torch.manual_seed(0)
    unet = build_unet(tiny_cfg.model)
    every = EMA(unet, decay=0.9, zero_stage=0, every=3)
    plain = EMA(unet, decay=0.9, zero_stage=0)
    for step in range(1, 8):
        _perturb(unet, step)
        every.after_step(unet, step)
        if step % 3 == 0:
            plain.update(unet)       # the same per-update decay and warmup, on steps 3 and 6
    assert every.updates == plain.updates == 2
    for k in plain.shadow:
        assert torch.equal(every.shadow[k], plain.shadow[k]), k


def test_state_dict_roundtrip_is_cpu_and_exact(tiny_cfg):
    torch.manual_seed(0)
    unet = build_unet(tiny_cfg.model)
    ema = EMA(unet, decay=0.99, zero_stage=0)
    _perturb(unet, 1)
    ema.update(unet)
    state = ema.state_dict()
    assert all(v.device.type == "cpu" for v in state["shadow"].values())
    other = EMA(build_unet(tiny_cfg.model), decay=0.99, zero_stage=0)
    other.load_state_dict(state)
    assert other.updates == 1
    assert all(torch.equal(other.shadow[k], ema.shadow[k]) for k in ema.shadow)


@pytest.mark.gpu
def test_shadow_lives_on_the_gpu(tiny_cfg):
    unet = build_unet(tiny_cfg.model).cuda()
    ema = EMA(unet, decay=0.99, zero_stage=0)
    assert all(v.device.type == "cuda" for v in ema.shadow.values())
    ema.update(unet)
    assert all(v.device.type == "cpu" for v in ema.cpu_shadow().values())


def test_ema_every_validated():
    assert load_config(None, ["train.ema_every=10"]).train.ema_every == 10
    assert load_config(None).train.ema_every == 1            # default: every step, as before
    with pytest.raises(CxrError, match="train.ema_every must be > 0"):
        load_config(None, ["train.ema_every=0"])
