"""Smoke tests for bench/: every section runs end to end at tiny sizes (numbers are not checked)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import accuracy, common, denoiser, gpu, gpu_sampling, guidance, loader, sampling, train  # noqa: E402
from bench.report import write_readme_snippet  # noqa: E402


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh-weight exports go to a per-session folder, never into the repo's bench/cache."""
    monkeypatch.setattr(common, "CACHE", tmp_path_factory.getbasetemp() / "bench-cache")


def test_interleaved_rotates_and_respects_budget() -> None:
    order: list[str] = []
    calls = {k: (lambda k=k: order.append(k)) for k in "abc"}
    res = common.interleaved(calls, runs=4, warmup=1)
    assert set(res) == {"a", "b", "c"} and all(r["n"] == 4 for r in res.values())
    rounds = [order[i:i + 3] for i in range(3, len(order), 3)]
    assert [r[0] for r in rounds] == ["a", "b", "c", "a"]          # first slot rotates
    slow = {"x": lambda: __import__("time").sleep(0.02)}
    assert common.interleaved(slow, runs=10, min_runs=2, budget_s=0.01)["x"]["n"] == 2


def test_write_section_has_machine_info_and_table(tmp_path: Path) -> None:
    md = common.md_table([{"a": 1.23456, "b": None}], [("a", "A"), ("b", "B")])
    assert md.splitlines()[0] == "| A | B |" and "1.23" in md
    common.write_section(tmp_path, "demo", {"rows": []}, md)
    doc = json.loads((tmp_path / "demo.json").read_text())
    m = doc["machine"]
    assert m["cpu"] and m["cores_logical"] >= 1 and len(m["load_avg_1_5_15"]) == 3
    assert {"python", "torch", "onnxruntime", "numpy", "deepspeed", "denoising-diffusion-pytorch"} <= set(m["versions"])
    assert (tmp_path / "demo.md").read_text() == md
    assert not list(tmp_path.glob(".*.tmp"))


def test_denoiser_section(tmp_path: Path) -> None:
    denoiser.run(tmp_path, models=("tiny",), sizes=(32,), batches=(1,), runs=1, compile_at=None, extras=False)
    doc = json.loads((tmp_path / "denoiser.json").read_text())
    variants = {r["variant"] for r in doc["rows"]}
    assert {"eager", "eager_cl", "ort_fp32", "ort_fp16"} <= variants
    eager_ms = next(r for r in doc["rows"] if r["variant"] == "eager")["median_ms"]
    for r in doc["rows"]:                              # every ratio is eager time / this variant's time
        assert r["speedup_vs_eager"] == pytest.approx(eager_ms / r["median_ms"], abs=6e-4)   # rounded to 3 places
    assert doc["flops"][0]["gflops_per_image"] > 0
    assert (tmp_path / "denoiser.png").read_bytes()[:4] == b"\x89PNG"


def test_compile_time_box_records_failure(tiny_ckpt: Path) -> None:
    x, t = np.zeros((1, 1, 32, 32), np.float32), np.zeros((1,), np.int64)
    fn, info = denoiser.compiled_call(tiny_ckpt, x, t, limit_s=1)
    assert fn is None and info["compile_status"].startswith("failed:") and "TimeoutError" in info["compile_status"]


def test_sampling_section_labels_extrapolated_rows(tmp_path: Path) -> None:
    sampling.run(tmp_path, models=(("tiny", 32, False),), batch=1, measure_steps=1)
    rows = json.loads((tmp_path / "sampling.json").read_text())["rows"]
    assert {r["backend"] for r in rows} == {"ort", "torch"}
    assert sum(r["how"] == "measured" for r in rows) == 2
    ddpm = next(r for r in rows if r["sampler"] == "ddpm" and r["backend"] == "ort")
    assert ddpm["steps"] == 100 and ddpm["how"].startswith("extrapolated")
    assert not any(r["steps"] == 250 for r in rows)                # ddim 250 > T = 100


def test_accuracy_section_on_fixture_checkpoint(tmp_path: Path, tiny_ckpt: Path) -> None:
    accuracy.run(tmp_path, ckpt=tiny_ckpt, n=1, grid=(("ddim", 5), ("dpmpp-2m", 20), ("ddim", 100)))
    doc = json.loads((tmp_path / "accuracy.json").read_text())
    by = {(r["sampler"], r["steps"]): r for r in doc["rows"]}
    assert by[("ddim", 5)]["rmse"] > by[("ddim", 100)]["rmse"] >= 0   # fewer steps: further from the T-step run
    assert doc["goal"]["sampler"] == "dpmpp-2m" and doc["goal"]["steps"] == 20
    assert (tmp_path / "accuracy.png").is_file()


def test_rmse_in_unit_pixel_space() -> None:
    a, b = np.full((1, 1, 2, 2), -1.0), np.full((1, 1, 2, 2), 1.0)
    assert accuracy.rmse01(a, b) == pytest.approx(1.0)


def test_guidance_section_compares_one_batched_call(tmp_path: Path) -> None:
    guidance.run(tmp_path, models=(("tiny", 32),), batches=(2,), runs=2, budget_s=1.0)
    row = json.loads((tmp_path / "guidance.json").read_text())["rows"][0]
    assert row["batch"] == 2 and row["guided_ratio"] > 0 and row["two_calls_ratio"] > 0
    assert "guided / unguided" in (tmp_path / "guidance.md").read_text()


def test_gpu_section_pending_without_cuda(tmp_path: Path) -> None:
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the pending path does not apply")
    gpu.run(tmp_path, models=(("tiny", 32),))
    doc = json.loads((tmp_path / "gpu.json").read_text())
    assert doc["status"] == "pending" and "no CUDA" in doc["why"] and doc["flops"][0]["gflops_per_image"] > 0
    planned = doc["sampling_planned"]
    assert doc["sampling_status"] == "pending" and len(planned) == 12
    assert any("fp16 graph cupy" in p for p in planned) and any("fp32 plain numpy" in p for p in planned)
    assert "fp16 graph cupy" in (tmp_path / "gpu.md").read_text()


def test_gpu_sampling_rows_say_why_not_measured() -> None:
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu present: the rows would be measured")
    res = gpu_sampling.run_all({}, "tiny", 32, [], step_batch=1, e2e_batch=2, steps=2, runs=1, repeats=1)
    assert res["sampling_status"].startswith("not measured: onnxruntime") and "onnxruntime-gpu" in res["sampling_status"]
    rows = [{"model": "m", "px": 8, "batch": 16, "variant": v, "median_ms": ms} for v, ms in (("eager_bf16", 1.0),
                                                                                           ("eager_fp32", 4.0))]
    assert gpu_sampling.eager_fp32_ms(rows, "m", 8, 16) == 4.0 and gpu_sampling.eager_fp32_ms(rows, "m", 8, 1) is None


@pytest.mark.gpu
def test_gpu_section_measures_runtime_variants(tmp_path: Path) -> None:
    gpu.run(tmp_path, models=(("tiny", 32),), batches=(1,), runs=2, sampling=("tiny", 32), step_batch=1,
            e2e_batch=2, e2e_steps=2, e2e_repeats=1)
    doc = json.loads((tmp_path / "gpu.json").read_text())
    assert doc["sampling_status"] == "measured", doc["sampling_status"]
    step = {r["variant"]: r for r in doc["sampling_step_rows"]}
    base = step["fp32 plain numpy"]
    for r in step.values():                         # every ratio is the baseline's time / this row's
        if "median_ms" in r:
            assert r["vs_ort_fp32_numpy"] == pytest.approx(base["median_ms"] / r["median_ms"], rel=2e-3)
    e2e = {r["variant"]: r for r in doc["sampling_e2e_rows"]}
    assert e2e["fp32 plain numpy"]["s_per_image"] > 0 and e2e["fp32 plain numpy"]["session_s"] > 0


@pytest.mark.slow
def test_train_section_one_rank(tmp_path: Path, cxr_mini: Path) -> None:
    train.run(tmp_path, data=str(cxr_mini), ranks=1, steps=2, stages=(0,), precisions=("fp32",), global_batch=2,
              overhead_variants=(("fit", ()),))
    doc = json.loads((tmp_path / "train.json").read_text())
    floor, fit = doc["overhead"]
    assert floor["images_per_s"] > 0 and fit["vs_floor"] == pytest.approx(fit["images_per_s"] / floor["images_per_s"],
                                                                           rel=0.01)
    rows = doc["rows"]
    assert len(rows) == 1 and rows[0]["images_per_s"] > 0 and rows[0]["peak_mem_mib_per_rank"] > 0, rows


def test_train_mfu_column_only_on_cuda() -> None:
    import torch
    rows = [{"images_per_s": 10.0}, {"error": "x"}]
    note = train.add_mfu(rows, str(ROOT / "configs" / "tiny.yaml"))
    if torch.cuda.is_available():
        assert note.startswith("MFU = 3 x") and 0 < rows[0]["mfu_vs_bf16_peak"] < 1 and "mfu_vs_bf16_peak" not in rows[1]
    else:
        assert note == "MFU: n/a (no CUDA device; CPU ranks)" and "mfu_vs_bf16_peak" not in rows[0]


def test_train_failure_is_recorded_not_raised(tmp_path: Path, cxr_mini: Path) -> None:
    row = train.run_one(str(ROOT / "configs" / "tiny.yaml"), str(tmp_path / "missing"), 0, "fp32",
                        tmp_path / "run", ranks=1, threads=1, global_batch=2, steps=1)
    assert "error" in row and "images_per_s" not in row


def test_readme_snippet_links_plots(tmp_path: Path) -> None:
    gpu_doc = {"status": "pending", "why": "pending: no CUDA", "flops": [], "rows": []}
    common.write_section(tmp_path, "gpu", gpu_doc, "x")
    text = write_readme_snippet(tmp_path).read_text()
    assert "python -m bench all --out bench/results" in text and "pending: no CUDA" in text


def test_cli_bad_out_folder_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    p = subprocess.run([sys.executable, "-m", "bench", "gpu", "--out", str(blocker / "sub")], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("error:") and len(p.stderr.strip().splitlines()) == 1
    assert "Traceback" not in p.stderr and not (blocker / "sub").exists()


def test_cli_unknown_section(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "bench", "nope", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 2 and "invalid choice" in p.stderr and not list(tmp_path.iterdir())


def test_loader_section_raw_vs_prepared(tmp_path: Path, cxr_mini: Path) -> None:
    loader.run(tmp_path, data=str(cxr_mini), sizes=(16,), workers=(0,), seconds=0.05, rounds=1, megapixels=(0.2,))
    rows = json.loads((tmp_path / "loader.json").read_text())["rows"]
    assert [r["source"] for r in rows] == ["bundled (<=512 px)", "upscaled 0.2 MP"]
    assert all(r["raw_img_s"] > 0 and r["prepared_img_s"] > 0 for r in rows), rows
    assert "| prepared / raw |" in (tmp_path / "loader.md").read_text()
