"""The device-side EMA: one fused lerp, as the per-tensor loop it replaced; bf16 feeds it fp32 masters."""
from __future__ import annotations

import pytest
import torch

from cxr_ddpm.train.config import load_config
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.train.ema import EMA, fp32_masters
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


def test_bf16_ema_is_fed_the_fp32_masters(tmp_path, cxr_mini, tiny_cfg):
    """bf16 under DeepSpeed: the module holds bf16 copies, the optimizer the fp32 weights it updates.
    A real 4-step `cxr-train fit` (ZeRO-2, gloo): its EMA must be the average of the fp32 masters
    (read back independently, with DeepSpeed's zero_to_fp32 from each step's checkpoint), not of
    the bf16-rounded module weights (the checkpoints' `module`)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from builders import fit_cmd, run_ok

    from cxr_ddpm.train.state import seed_everything

    run = tmp_path / "run"
    # DeepSpeed's WarmupLR runs steps 1 and 2 at lr 0 (warmup 1): steps 3 and 4 train
    run_ok(fit_cmd(cxr_mini, run, "train.steps=4", "train.precision=bf16", "train.zero_stage=2",
                   "train.warmup_steps=1", "train.save_every=1", "train.keep_last=4"))
    ds = run / "deepspeed"
    masters, rounded = [], []
    for step in (1, 2, 3, 4):
        tag = f"step_{step:08d}"
        masters.append({k.removeprefix("unet."): v.float()
                        for k, v in get_fp32_state_dict_from_zero_checkpoint(str(ds), tag=tag).items()})
        module = torch.load(ds / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        rounded.append({k.removeprefix("unet."): v for k, v in module.items()})
    assert rounded[1]["init_conv.weight"].dtype == torch.bfloat16
    assert not torch.equal(masters[3]["init_conv.weight"], masters[2]["init_conv.weight"])   # it trains
    ema = torch.load(ds / "step_00000004" / "ema.pt", weights_only=True)
    assert ema["updates"] == 4

    seed_everything(tiny_cfg.train.seed)              # the initial weights fit starts from, as bf16
    unet = build_unet(tiny_cfg.model, capability=None)
    init = {k: v.to(torch.bfloat16).float() for k, v in unet.state_dict().items()}

    def ema_of(feeds: list[dict]) -> dict:
        shadow = {k: v.clone() for k, v in init.items()}
        for n, feed in enumerate(feeds):
            d = min(tiny_cfg.train.ema_decay, (1 + n) / (10 + n))
            for k in masters[0]:
                shadow[k].lerp_(feed[k].float(), 1.0 - d)
        return shadow

    want, bf16_fed = ema_of(masters), ema_of(rounded)
    assert set(masters[0]) == {k for k, v in init.items() if v.is_floating_point()}   # every weight
    for k in masters[0]:
        torch.testing.assert_close(ema["shadow"][k], want[k], rtol=1e-6, atol=1e-7, msg=k)
    off = max((ema["shadow"][k] - bf16_fed[k]).abs().max().item() for k in masters[0])
    assert off > 1e-5                      # bf16 rounding (~2^-9 relative) is far above fp32's


def test_fp32_weights_feed_the_ema_themselves(tiny_cfg):
    # fp32 training: the module holds the optimizer's weights; the update path is the one above
    torch.manual_seed(0)
    unet = build_unet(tiny_cfg.model)
    assert fp32_masters(unet, optimizer=object()) == {}
    a, b = EMA(unet, decay=0.9, zero_stage=0), EMA(unet, decay=0.9, zero_stage=0)
    _perturb(unet, 3)
    a.update(unet)
    b.update(unet, optimizer=object())
    assert all(torch.equal(a.shadow[k], b.shadow[k]) for k in a.shadow)
