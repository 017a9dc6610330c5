"""cxr-export onnx / verify on the tiny model: real torch.onnx exports, real ORT sessions."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner, Result

from conftest import assert_user_error
from cxr_ddpm.export import onnx_export
from cxr_ddpm.export.cli import main
from cxr_ddpm.export.onnx_export import export_onnx
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.contract.metadata import METADATA_KEY, read_onnx_metadata
from cxr_ddpm.runtime.sampling.schedule import Schedule
from cxr_ddpm.train.checkpoint import load_checkpoint, save_checkpoint
from cxr_ddpm.train.config import config_from_metadata
from cxr_ddpm.train.model import build_diffusion, build_unet

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(res: Result, needle: str) -> None:
    assert_user_error(res, needle, progress=True)    # stderr also holds exporter/tqdm progress


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture
def fast_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Use the legacy exporter (a few s instead of ~20 s) in tests that are about something else."""
    monkeypatch.setattr(onnx_export, "EXPORTERS", ("legacy",))


@pytest.fixture(scope="module")
def fp32_export(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> onnx_export.ExportResult:
    return export_onnx(tiny_ckpt, tmp_path_factory.mktemp("onnx") / "tiny.onnx")   # default: dynamo, fp32


@pytest.fixture(scope="module")
def fp16_export(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx16") / "tiny16.onnx"
    res = run_cli("onnx", "--ckpt", tiny_ckpt, "--out", out, "--precision", "fp16")
    assert res.exit_code == 0, res.output
    assert "verified:" in res.stdout and f"wrote {out}" in res.stdout
    return out


# -- happy path ----------------------------------------------------------------------------

def test_fp32_export_parity_batch_1_and_3(fp32_export) -> None:
    res = fp32_export
    assert res.exporter == "dynamo" and res.opset == 18 and res.path.is_file()
    rep = res.report
    assert rep.ok and {r.batch for r in rep.rows} == {1, 3} and {r.timestep for r in rep.rows} == {0, 50, 99}
    assert max(r.rel for r in rep.rows) < 1e-4
    assert leftovers(res.path.parent) == ["tiny.onnx"]          # no temp files left behind


def test_metadata_round_trip(fp32_export, tiny_ckpt: Path, tiny_cfg) -> None:
    meta = read_onnx_metadata(fp32_export.path)
    assert config_from_metadata(meta, "x") == tiny_cfg
    assert meta["kind"] == "onnx" and meta["objective"] == "pred_v" and meta["image_size"] == 32
    assert meta["schedule"]["alphas_cumprod_sha256"] == Schedule.from_config(tiny_cfg.diffusion).digest()
    assert meta["class_names"] == ["COVID-19", "Normal"]
    ck = load_checkpoint(tiny_ckpt)
    assert meta["source"] == {"checkpoint_sha256": ck.sha256, "step": 0, "weights": "ema", "path": str(ck.path)}
    assert (meta["exporter"], meta["opset"], meta["precision"]) == ("dynamo", 18, "fp32")
    assert meta["batch"] == {"min": 1, "opt": 4, "max": 16}
    assert meta["null_class"] is None and meta["self_condition"] is False
    assert meta["io"]["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["B", 1, 32, 32]},
                                    {"name": "t", "dtype": "int64", "shape": ["B"]}]
    # what the file really has agrees with what the metadata says
    sess = ort.InferenceSession(str(fp32_export.path), providers=["CPUExecutionProvider"])
    ins = {i.name: (i.type, i.shape) for i in sess.get_inputs()}
    assert ins == {"x": ("tensor(float)", ["B", 1, 32, 32]), "t": ("tensor(int64)", ["B"])}
    assert [(o.name, o.shape) for o in sess.get_outputs()] == [("out", ["B", 1, 32, 32])]
    assert json.loads(sess.get_modelmeta().custom_metadata_map[METADATA_KEY]) == meta


def test_output_matches_lucidrains_model_prediction(fp32_export, tiny_ckpt: Path) -> None:
    """The graph's `out` is exactly what GaussianDiffusion.model_predictions feeds on (t as long)."""
    ck = load_checkpoint(tiny_ckpt)
    diffusion = build_diffusion(ck.cfg, ck.build_unet()).eval()
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([3, 97])
    with torch.no_grad():
        ref = diffusion.model(x, t).numpy()
    sess = ort.InferenceSession(str(fp32_export.path), providers=["CPUExecutionProvider"])
    got = sess.run(["out"], {"x": x.numpy(), "t": t.numpy()})[0]
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_fp16_export_keeps_fp32_io_and_verifies(fp16_export: Path, fp32_export, tiny_ckpt: Path) -> None:
    meta = read_onnx_metadata(fp16_export)
    assert meta["precision"] == "fp16"
    model = onnx.load(str(fp16_export))
    f32 = onnx.TensorProto.FLOAT
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [f32, onnx.TensorProto.INT64]
    assert model.graph.output[0].type.tensor_type.elem_type == f32
    big = [i for i in model.graph.initializer if np.prod(i.dims) >= 64]
    assert big and all(i.data_type == onnx.TensorProto.FLOAT16 for i in big)
    assert fp16_export.stat().st_size < 0.7 * fp32_export.size_bytes
    res = run_cli("verify", fp16_export, "--ckpt", tiny_ckpt)          # no --batch: the range the ONNX records
    assert res.exit_code == 0, res.output
    assert "ok: worst error" in res.stdout and "fp16" in res.stdout
    rows = [ln.split() for ln in res.stdout.splitlines() if ln.split()[-1:] in (["yes"], ["NO"])]
    rec = meta["batch"]
    assert sorted({int(r[1]) for r in rows}) == sorted({rec["min"], rec["opt"], rec["max"]}) == [1, 4, 16]


def test_verify_command_fp32(fp32_export, tiny_ckpt: Path) -> None:
    res = run_cli("verify", fp32_export.path, "--ckpt", tiny_ckpt.parent, "--batch", "2")  # run-folder-like dir
    # tiny_ckpt's folder is not a run folder (no checkpoints/), so resolve refuses it clearly
    assert_one_line_error(res, "holds no consolidated checkpoint")
    res = run_cli("verify", fp32_export.path, "--ckpt", tiny_ckpt, "--batch", "2")    # N = N:N:N
    assert res.exit_code == 0, res.output
    assert res.stdout.count("yes") == 3                               # 3 timesteps x batch 2
    res = run_cli("verify", fp32_export.path, "--ckpt", tiny_ckpt, "--batch", "1:1:3")
    assert res.exit_code == 0, res.output
    assert res.stdout.count("yes") == 6                               # 3 timesteps x batches 1 and 3


def test_verify_detects_tampered_onnx(fp32_export, tiny_ckpt: Path, tmp_path: Path) -> None:
    model = onnx.load(str(fp32_export.path))
    init = next(i for i in model.graph.initializer if "final_conv" in i.name and i.data_type == 1)
    arr = onnx.numpy_helper.to_array(init).copy()
    arr.flat[0] += 0.5
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(tmp_path / "bad.onnx"))
    assert_one_line_error(run_cli("verify", tmp_path / "bad.onnx", "--ckpt", tiny_ckpt), "verification failed")


def test_lucidrains_pt_with_config(tmp_path: Path, tiny_cfg, fast_exporter) -> None:
    torch.manual_seed(1)
    diffusion = build_diffusion(tiny_cfg)
    torch.save({"step": 5, "model": diffusion.state_dict(),
                "ema": {f"ema_model.{k}": v for k, v in diffusion.state_dict().items()}}, tmp_path / "model-5.pt")
    out = tmp_path / "out" / "m.onnx"
    res = run_cli("onnx", "--ckpt", tmp_path / "model-5.pt", "--config", ROOT / "configs/tiny.yaml", "--out", out)
    assert res.exit_code == 0, res.output
    meta = read_onnx_metadata(out)
    assert meta["source"]["step"] == 5 and meta["exporter"] == "legacy"
    # the same file against another schedule's or architecture's config: one line, nothing written
    other = tmp_path / "other.onnx"
    res = run_cli("onnx", "--ckpt", tmp_path / "model-5.pt", "--config", ROOT / "configs/cxr128.yaml", "--out", other)
    assert_one_line_error(res, "checkpoint has diffusion.timesteps=100 but the config says diffusion.timesteps=1000")
    wider = tmp_path / "wider.yaml"
    wider.write_text((ROOT / "configs" / "tiny.yaml").read_text().replace("dim: 16", "dim: 32"))
    res = run_cli("onnx", "--ckpt", tmp_path / "model-5.pt", "--config", wider, "--out", other)
    assert_one_line_error(res, "weights do not fit the model")
    assert not other.exists()


def test_injected_numeric_error_fails_and_writes_nothing(tiny_ckpt: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, fast_exporter) -> None:
    original = onnx_export.finalize_model

    def perturbed(model, doc, precision):          # a wrong weight slipped into the graph
        model = original(model, doc, precision)
        init = next(i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and i.dims)
        arr = onnx.numpy_helper.to_array(init).copy() * 1.5 + 0.1
        init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
        return model

    monkeypatch.setattr(onnx_export, "finalize_model", perturbed)
    out = tmp_path / "x.onnx"
    res = run_cli("onnx", "--ckpt", tiny_ckpt, "--out", out)
    assert_one_line_error(res, "verification failed: worst error")
    assert "nothing written" in res.stderr and leftovers(tmp_path) == []
    export_onnx(tiny_ckpt, out, verify=False)        # --no-verify writes (that is what it is for)
    assert leftovers(tmp_path) == ["x.onnx"]


# -- bad input: one line, exit 2, nothing at the target --------------------------------------

@pytest.fixture
def wrong_arch_ckpt(tmp_path: Path, tiny_cfg) -> Path:
    """A .safetensors whose tensors don't fit the architecture its own config describes."""
    from cxr_ddpm.train.config import load_config
    other = build_unet(load_config(ROOT / "configs/tiny.yaml", ["model.dim=8"]).model).state_dict()
    return save_checkpoint(tmp_path / "wrong.safetensors", cfg=tiny_cfg, step=1, class_names=[],
                           ema=other, online=other)


@pytest.mark.parametrize("case, needle", [
    ("missing", "checkpoint not found"),
    ("corrupt", "not a safetensors file"),
    ("wrong_arch", "weights do not fit the model"),
    ("batch_order", "need 1 <= MIN <= OPT <= MAX"),
    ("batch_text", "expected MIN:OPT:MAX"),
    ("opset", "supported opsets are 17..23 (minimum 17"),
    ("unwritable", "cannot create output folder"),
])
def test_bad_input(case: str, needle: str, tmp_path: Path, tiny_ckpt: Path, request: pytest.FixtureRequest) -> None:
    out = tmp_path / "out.onnx"
    args = ["onnx", "--ckpt", tiny_ckpt, "--out", out]
    if case == "missing":
        args[2] = tmp_path / "nope.safetensors"
    elif case == "corrupt":
        (tmp_path / "bad.safetensors").write_bytes(os.urandom(4096))
        args[2] = tmp_path / "bad.safetensors"
    elif case == "wrong_arch":
        args[2] = request.getfixturevalue("wrong_arch_ckpt")
    elif case == "batch_order":
        args += ["--batch", "4:2:8"]
    elif case == "batch_text":
        args += ["--batch", "a:b:c"]
    elif case == "opset":
        args += ["--opset", "9"]
    elif case == "unwritable":                  # root ignores chmod; a regular file blocks any path under it
        (tmp_path / "file.txt").write_text("x")
        out = tmp_path / "file.txt" / "out.onnx"
        args[4] = out
    before = leftovers(tmp_path)
    assert_one_line_error(run_cli(*args), needle)
    assert not out.exists() and leftovers(tmp_path) == before


@pytest.mark.parametrize("command", ["onnx", "trt", "inception"])
def test_folder_as_output_refused_first(command: str, tmp_path: Path, tiny_ckpt: Path) -> None:
    """An existing folder as --out: one line before any work (it failed at the final rename)."""
    out = tmp_path / "dir"
    out.mkdir()
    args = {"onnx": ["--ckpt", tiny_ckpt], "trt": ["--onnx", tmp_path / "x.onnx"], "inception": []}[command]
    res = run_cli(command, *args, "--out", out)
    assert_one_line_error(res, f"--out {out}: is a folder")
    assert "exporting with" not in res.stderr and leftovers(out) == []


def test_run_folder_export_names_its_step(tmp_path: Path, tiny_cfg, fast_exporter) -> None:
    """A run folder exports its newest consolidated checkpoint, and says which; a newer complete
    exact-resume state without its consolidated file (a run killed between the two) is named.
    A temp file left at the target by an export killed mid-write (kill -9 runs no cleanup) goes."""
    from cxr_ddpm.train import state
    run = tmp_path / "run"
    sd = build_unet(tiny_cfg.model).state_dict()
    older = save_checkpoint(run / "checkpoints" / "step_00000010.safetensors", cfg=tiny_cfg, step=10,
                            class_names=[], ema=sd, online=sd)
    newer = run / state.DS_DIR / "step_00000020"
    newer.mkdir(parents=True)
    state.mark_complete(newer, {"step": 20})
    out = tmp_path / "onnx" / "unet.onnx"
    out.parent.mkdir()
    (out.parent / ".unet.onnx.k1ll3d.tmp").write_bytes(b"half an onnx")
    res = run_cli("onnx", "--ckpt", run, "--out", out, "--no-verify")
    assert res.exit_code == 0, res.output
    assert f"wrote {out} from step 10 (ema weights of {older};" in res.stdout
    assert f"checkpoint: {older} (step 10)" in res.stderr
    assert f"warning: {newer} is newer than step 10 but has no consolidated checkpoint" in res.stderr
    assert leftovers(out.parent) == ["unet.onnx"]


def test_read_onnx_metadata_refusals(tmp_path: Path) -> None:
    with pytest.raises(CxrError, match="ONNX file not found"):
        read_onnx_metadata(tmp_path / "nope.onnx")
    (tmp_path / "junk.onnx").write_bytes(os.urandom(2000))
    with pytest.raises(CxrError, match="not a readable ONNX model"):
        read_onnx_metadata(tmp_path / "junk.onnx")
    plain = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["a"], ["b"])], "g",
        [onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [1])]))
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    with pytest.raises(CxrError, match="no 'cxr_ddpm' metadata"):
        read_onnx_metadata(tmp_path / "plain.onnx")


@pytest.mark.parametrize("override", ["model.num_classes=2,diffusion.beta_schedule=cosine",
                                      "model.self_condition=true"])
def test_conditional_and_self_conditioned_inputs(override: str, tmp_path: Path, fast_exporter) -> None:
    """`class` (num_classes = the null label) and `x_self_cond` inputs, as the runtime contract says."""
    from cxr_ddpm.train.config import load_config
    cfg = load_config(ROOT / "configs/tiny.yaml", override.split(","))
    torch.manual_seed(0)
    unet = build_unet(cfg.model).eval()
    ck = save_checkpoint(tmp_path / "c.safetensors", cfg=cfg, step=3, class_names=["a", "b"],
                         ema=unet.state_dict(), online=unet.state_dict())
    res = export_onnx(ck, tmp_path / "c.onnx", verify_batches=(3,))
    assert res.report.ok
    meta = read_onnx_metadata(res.path)
    names = [i["name"] for i in meta["io"]["inputs"]]
    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == names
    x, t = torch.randn(3, 1, 32, 32), torch.tensor([0, 50, 99])
    if cfg.model.num_classes:
        assert names == ["x", "t", "class"] and meta["null_class"] == 2
        cls = torch.tensor([0, 1, 2])
        got = sess.run(["out"], {"x": x.numpy(), "t": t.numpy(), "class": cls.numpy()})[0]
        with torch.no_grad():   # label 2 = lucidrains' learned null embedding (cond_drop_prob=1)
            cond = unet(x, t, classes=torch.tensor([0, 1, 0]), cond_drop_prob=0.0).numpy()
            null = unet(x, t, classes=torch.tensor([0, 1, 0]), cond_drop_prob=1.0).numpy()
        np.testing.assert_allclose(got[:2], cond[:2], atol=1e-4)
        np.testing.assert_allclose(got[2:], null[2:], atol=1e-4)
    else:
        assert names == ["x", "t", "x_self_cond"] and meta["self_condition"] is True
        sc = torch.randn(3, 1, 32, 32).clamp(-1, 1)
        got = sess.run(["out"], {"x": x.numpy(), "t": t.numpy(), "x_self_cond": sc.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, unet(x, t, sc).numpy(), atol=1e-4)
