"""Checkpoint format: round trip, lucidrains model-N.pt import, refusal of everything else."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cxr_ddpm.train.config import load_config
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.contract.metadata import FORMAT_VERSION, METADATA_KEY
from cxr_ddpm.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from cxr_ddpm.train.model import build_unet

from builders import lucidrains_file as _lucidrains_file

ROOT = Path(__file__).resolve().parents[1]


def _perturbed(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v + 0.01 if v.is_floating_point() else v for k, v in sd.items()}


def test_round_trip_identical_tensors_and_config(tmp_path: Path, tiny_cfg) -> None:
    torch.manual_seed(1)
    online = build_unet(tiny_cfg.model).state_dict()
    ema = _perturbed(online)
    path = save_checkpoint(tmp_path / "c.safetensors", cfg=tiny_cfg, step=42, class_names=["COVID-19", "Normal"],
                           ema=ema, online=online, data_fingerprint="abc")
    ck = load_checkpoint(path)
    assert ck.cfg == tiny_cfg and ck.step == 42 and ck.class_names == ["COVID-19", "Normal"]
    for k in online:
        assert torch.equal(ck.online[k], online[k]) and torch.equal(ck.ema[k], ema[k])
    assert ck.weights() is ck.ema and ck.weights(ema=False) is ck.online  # EMA preferred
    prov = ck.meta["provenance"]
    assert prov["data_fingerprint"] == "abc" and prov["package_version"]
    assert ck.meta["schedule"]["alphas_cumprod_sha256"] and ck.meta["format_version"] == FORMAT_VERSION
    unet = ck.build_unet()
    assert torch.equal(unet.state_dict()["init_conv.weight"], ema["init_conv.weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temp files left
    assert path.stat().st_mode & 0o044  # readable by the group/others (mkstemp alone gives 0600)


def test_run_folder_resolves_to_newest(tmp_path: Path, tiny_cfg) -> None:
    sd = build_unet(tiny_cfg.model).state_dict()
    for step in (5, 20, 10):
        save_checkpoint(tmp_path / "checkpoints" / f"step_{step:08d}.safetensors", cfg=tiny_cfg,
                        step=step, class_names=[], ema=sd, online=None)
    assert latest_checkpoint(tmp_path).name == "step_00000020.safetensors"
    assert load_checkpoint(tmp_path).step == 20
    with pytest.raises(CxrError, match="holds no consolidated checkpoint"):
        load_checkpoint(tmp_path / "checkpoints" / ".." / "checkpoints")


def test_lucidrains_trainer_checkpoint_import(tmp_path: Path, tiny_cfg) -> None:
    data = _lucidrains_file(tmp_path / "model-7.pt", tiny_cfg)
    ck = load_checkpoint(tmp_path / "model-7.pt", config=tiny_cfg)
    assert ck.step == 7 and ck.meta["provenance"]["imported_from"] == "lucidrains"
    assert torch.equal(ck.online["init_conv.weight"], data["model"]["model.init_conv.weight"])
    assert torch.equal(ck.ema["init_conv.weight"], data["ema"]["ema_model.model.init_conv.weight"])
    assert not torch.equal(ck.ema["init_conv.weight"], ck.online["init_conv.weight"])
    for ema, want in ((True, ck.ema), (False, ck.online)):     # the built U-Net holds those weights
        got = ck.build_unet(ema=ema).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_lucidrains_needs_config(tmp_path: Path, tiny_cfg) -> None:
    _lucidrains_file(tmp_path / "model-1.pt", tiny_cfg)
    with pytest.raises(CxrError, match="carry no model config; pass --config"):
        load_checkpoint(tmp_path / "model-1.pt")


def test_lucidrains_wrong_architecture(tmp_path: Path, tiny_cfg) -> None:
    _lucidrains_file(tmp_path / "model-1.pt", tiny_cfg)
    other = load_config(ROOT / "configs" / "tiny.yaml", ["model.dim=32"])
    with pytest.raises(CxrError, match="weights do not fit the model"):
        load_checkpoint(tmp_path / "model-1.pt", config=other).build_unet()


def test_config_mismatch_is_named(tiny_ckpt: Path) -> None:
    other = load_config(ROOT / "configs" / "tiny.yaml", ["diffusion.timesteps=200"])
    with pytest.raises(CxrError, match=r"diffusion.timesteps=100 does not match the requested diffusion.timesteps=200"):
        load_checkpoint(tiny_ckpt, config=other)


@pytest.mark.parametrize("name, content, needle", [
    ("x.safetensors", b"\x00" * 64, "not a safetensors file"),
    ("x.safetensors", None, "corrupt or truncated"),
    ("x.bin", b"random bytes here", "unknown checkpoint format"),
    ("x.pt", b"PK\x03\x04 not really a zip", "cannot read as a torch checkpoint"),
])
def test_refuses_garbage(tmp_path: Path, tiny_ckpt: Path, name: str, content: bytes | None, needle: str) -> None:
    path = tmp_path / name
    path.write_bytes(content if content is not None else tiny_ckpt.read_bytes()[:-100])
    with pytest.raises(CxrError, match=needle):
        load_checkpoint(path)


def test_refuses_other_torch_dicts(tmp_path: Path, tiny_cfg) -> None:
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CxrError, match="not a lucidrains Trainer checkpoint.*found state_dict"):
        load_checkpoint(tmp_path / "other.pt", config=tiny_cfg)


def test_refuses_safetensors_without_our_metadata(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CxrError, match="no 'cxr_ddpm' metadata"):
        load_checkpoint(tmp_path / "plain.safetensors")


def test_refuses_newer_format_version(tmp_path: Path, tiny_ckpt: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(tiny_ckpt), "pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["format_version"] = FORMAT_VERSION + 1
    save_file(tensors, str(tmp_path / "new.safetensors"), metadata={METADATA_KEY: json.dumps(meta)})
    with pytest.raises(CxrError, match="newer than this cxr-ddpm understands"):
        load_checkpoint(tmp_path / "new.safetensors")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CxrError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "absent.safetensors")


def test_failed_save_leaves_nothing(tmp_path: Path, tiny_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that dies half-way (disk full, kill) leaves neither a file nor a temp file."""
    import safetensors.torch

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    sd = build_unet(tiny_cfg.model).state_dict()
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "c.safetensors", cfg=tiny_cfg, step=0, class_names=[], ema=sd, online=None)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- a lucidrains checkpoint vs its config

@pytest.mark.parametrize("override, field, have, said", [
    ("diffusion.timesteps=1000", "timesteps", "100", "1000"),
    ("diffusion.objective=pred_noise", "objective", "'pred_v'", "'pred_noise'"),
    ("diffusion.beta_schedule=cosine", "beta_schedule", "'sigmoid'", "'cosine'"),
])
def test_lucidrains_config_contradicting_the_checkpoint_is_refused(tmp_path: Path, tiny_cfg, override, field,
                                                                    have, said) -> None:
    _lucidrains_file(tmp_path / "model-1.pt", tiny_cfg)           # T=100, pred_v, sigmoid
    wrong = load_config(ROOT / "configs" / "tiny.yaml", [override])
    with pytest.raises(CxrError, match=f"checkpoint has diffusion.{field}={have} but the config says "
                                       f"diffusion.{field}={said}"):
        load_checkpoint(tmp_path / "model-1.pt", config=wrong)


def test_lucidrains_diffusion_taken_from_the_checkpoint(tmp_path: Path, tiny_cfg) -> None:
    """A config file without a diffusion section: T, schedule and objective come from the file's
    buffers (the defaults, T=1000 sigmoid pred_v, would otherwise be used silently)."""
    trained = load_config(ROOT / "configs" / "tiny.yaml", ["diffusion.objective=pred_noise",
                                                            "diffusion.beta_schedule=cosine"])
    _lucidrains_file(tmp_path / "model-2.pt", trained)
    (tmp_path / "model.yaml").write_text("model:\n  dim: 16\n  dim_mults: [1, 2]\n  image_size: 32\n")
    from cxr_ddpm.train.config import load_checkpoint_config
    cfg, derive = load_checkpoint_config(tmp_path / "model.yaml")
    assert derive and cfg.diffusion.timesteps == 1000
    ck = load_checkpoint(tmp_path / "model-2.pt", config=cfg, derive_diffusion=derive)
    d = ck.cfg.diffusion
    assert (d.timesteps, d.objective, d.beta_schedule) == (100, "pred_noise", "cosine")
    assert ck.meta["config"]["diffusion"]["timesteps"] == 100               # and the artifact says so
