"""`cxr-runtime sample` at its edges: bad numbers, NaN models, a full disk, DICOM conformance,
checkpoint records, resumed and sharded sets (issue #11 items 2-4, 6, 7, 9, 10; #15's shards)."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_user_error, small_tmpfs
from builders import lucidrains_file, run, sample


@pytest.mark.parametrize("args, needle", [
    (["--seed", "-1"], "--seed -1: must be an integer >= 0"),
    (["--seed", "1.5"], "'--seed': '1.5' is not a valid integer"),
    (["--sampler", "ddim", "--eta", "nan"], "--eta nan: must be a finite number in [0, 1]"),
    (["--sampler", "ddim", "--eta", "inf"], "--eta inf: must be a finite number in [0, 1]"),
    (["--sampler", "ddim", "--eta", "1.5"], "--eta 1.5: must be a finite number in [0, 1]"),
    (["--guidance", "3"], "--guidance: the model is unconditional"),
    (["--shard", "3/3"], "--shard '3/3': expected K/M with 0 <= K < M"),
    (["--request-time", "yesterday"], "--request-time 'yesterday': expected an ISO 8601 time"),
    (["--config", "configs/tiny.yaml"], "carries its own config; --config is for checkpoints only"),
])
def test_bad_numbers_are_one_line_and_write_nothing(onnx_path: Path, tmp_path: Path, args, needle) -> None:
    res = sample(onnx_path, tmp_path / "out", "-n", "2", "--steps", "2", *args)
    assert_user_error(res, needle)
    assert not (tmp_path / "out").exists()


def test_non_finite_model_output_stops_with_the_step(onnx_path: Path, tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(onnx_path))
    w = next(i for i in model.graph.initializer if len(i.dims) == 4)        # a convolution's weights
    w.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(w), np.nan), w.name))
    bad = tmp_path / "nan.onnx"
    onnx.save(model, str(bad))
    res = sample(bad, tmp_path / "out", "-n", "2", "--steps", "3")
    assert_user_error(res, "step 1/3 (t=99): the model returned non-finite values (NaN/inf) for images 0..1",
                      "0 complete images are kept and listed", progress=True)
    rec = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert rec["images"] == [] and rec["complete"] is False
    assert not list((tmp_path / "out").glob("sample_*"))                    # no black images


def test_disk_full_keeps_and_lists_every_complete_image(onnx_path: Path, tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small", "96k") as disk:
        res = sample(onnx_path, disk / "out", "-n", "64", "--steps", "2", "--batch-size", "4",
                     "--format", "png16")
        assert_user_error(res, "cannot write (No space left on device)", "complete images are kept and listed",
                          progress=True)
        out = disk / "out"
        rec = json.loads((out / "samples.json").read_text())
        on_disk = sorted(p.name for p in out.glob("sample_*.png"))
        assert 0 < len(rec["images"]) < 64 and sorted(rec["files"]) == on_disk   # listed == complete
        assert not list(out.glob(".*.tmp"))                                 # nothing half-written
        from cxr_ddpm.runtime.fsutil import file_sha256
        assert all(file_sha256(out / e["file"]) == e["sha256"] for e in rec["images"])


def _dcm(path: Path):
    import pydicom
    return pydicom.dcmread(path)


def test_dicom_set_is_one_study_one_series_deterministic_and_valid(onnx_path: Path, tmp_path: Path) -> None:
    when = "2026-11-26T17:00:00Z"
    for name in ("a", "b"):
        assert sample(onnx_path, tmp_path / name, "-n", "3", "--steps", "2", "--format", "dcm",
                      "--request-time", when).exit_code == 0
    files = sorted((tmp_path / "a").glob("*.dcm"))
    ds = [_dcm(f) for f in files]
    assert len({d.StudyInstanceUID for d in ds}) == 1 and len({d.SeriesInstanceUID for d in ds}) == 1
    assert [d.InstanceNumber for d in ds] == [1, 2, 3] and len({d.SOPInstanceUID for d in ds}) == 3
    assert ds[0].StudyDate == "20261126" and ds[0].StudyTime == "170000" and len(ds[0].SeriesDescription) <= 64
    for f in files:                                                         # the same request: the same bytes
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian dicom3tools) not installed: conformance not checked")
    for f in files:
        out = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True)
        errors = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]
        assert errors == [], errors


def test_run_folder_records_its_checkpoint(tiny_ckpt: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run" / "checkpoints"
    run_dir.mkdir(parents=True)
    shutil.copy(tiny_ckpt, run_dir / "step_00000005.safetensors")
    res = sample(tmp_path / "run", tmp_path / "out", "-n", "1", "--steps", "2")
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "out" / "samples.json").read_text())
    from cxr_ddpm.runtime.fsutil import file_sha256
    assert rec["checkpoint"] == str(run_dir / "step_00000005.safetensors")
    assert rec["engine_sha256"] == file_sha256(tiny_ckpt)


def test_lucidrains_checkpoint_samples_with_config(tmp_path: Path, tiny_cfg) -> None:
    lucidrains_file(tmp_path / "model-3.pt", tiny_cfg)
    res = sample(tmp_path / "model-3.pt", tmp_path / "out", "-n", "1", "--steps", "2")
    assert_user_error(res, "carry no model config; pass --config FILE")
    root = Path(__file__).resolve().parents[1]
    res = sample(tmp_path / "model-3.pt", tmp_path / "out", "-n", "1", "--steps", "2",
                 "--config", root / "configs" / "tiny.yaml")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "sample_00000.png").is_file()


@pytest.mark.parametrize("fmt", ["npy", "dcm"])
def test_shards_make_the_files_one_process_makes(onnx_path: Path, tmp_path: Path, fmt: str) -> None:
    """npy byte for byte; DICOM too (same pixels, UIDs and dates: they come from the request)."""
    common = ("-n", "7", "--steps", "2", "--batch-size", "2", "--request-time", "2026-11-26T17:00:00Z",
              "--format", fmt)
    assert sample(onnx_path, tmp_path / "one", *common).exit_code == 0
    for k in range(3):
        assert sample(onnx_path, tmp_path / "arr", *common, "--shard", f"{k}/3").exit_code == 0
    assert run("manifest", tmp_path / "arr").exit_code == 0
    one = json.loads((tmp_path / "one" / "samples.json").read_text())
    arr = json.loads((tmp_path / "arr" / "samples.json").read_text())
    assert one["request_sha256"] == arr["request_sha256"] and arr["shards"] == 3
    assert [(e["file"], e["sha256"]) for e in one["images"]] == [(e["file"], e["sha256"]) for e in arr["images"]]


def test_rerun_makes_only_what_is_missing(onnx_path: Path, tmp_path: Path) -> None:
    common = ("-n", "7", "--steps", "2", "--batch-size", "2", "--request-time", "2026-11-26T17:00:00Z")
    assert sample(onnx_path, tmp_path / "one", *common, "--format", "npy").exit_code == 0
    victim = tmp_path / "one" / "sample_00004.npy"
    victim.unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "one").glob("sample_*")}
    res = sample(onnx_path, tmp_path / "one", *common, "--format", "npy")
    assert res.exit_code == 0 and "wrote 1 images" in res.output and "6 kept from an earlier run" in res.output
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "one").glob("sample_*")}
    assert [n for n in after if after[n] != before.get(n)] == ["sample_00004.npy"]   # only the missing one
    res = sample(onnx_path, tmp_path / "one", "-n", "7", "--steps", "3", "--format", "npy")
    assert_user_error(res, "holds samples of another request")
