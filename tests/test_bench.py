"""Smoke tests for bench/: every section runs end to end at tiny sizes (numbers are not checked)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import accuracy, common, denoiser, gpu, gpu_sampling, guidance, loader, sampling, train  # noqa: E402
from bench.report import write_readme_snippet  # noqa: E402
from cxr_ddpm.runtime.sampling.timesteps import TIME_GRIDS  # noqa: E402


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


def test_compile_time_box_records_failure(tiny_ckpt: Path, tmp_path: Path) -> None:
    """Speed-independent: a compile child that never ends is cut off (its own children too), and
    a compile that really fails (3 channels into a 1-channel U-Net) is recorded, not raised."""
    x, t = np.zeros((1, 1, 32, 32), np.float32), np.zeros((1,), np.int64)
    pidfile = tmp_path / "grandchild.pid"
    hang = [sys.executable, "-c", "import subprocess, sys, time; "
            "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)']); "
            f"open({str(pidfile)!r}, 'w').write(str(g.pid)); time.sleep(3600)"]
    fn, info = denoiser.compiled_call(tiny_ckpt, x, t, limit_s=2, probe_cmd=hang)
    assert fn is None and info["compile_status"] == "failed: TimeoutError: exceeded 2 s"
    if pidfile.is_file():                                  # the grandchild got that far: it must be gone
        stat = Path(f"/proc/{pidfile.read_text()}/stat")

        def alive() -> bool:                               # SIGKILL is delivered, not yet acted on, at once
            try:
                return stat.read_text().split(") ")[1][0] != "Z"
            except (FileNotFoundError, ProcessLookupError):
                return False
        deadline = time.monotonic() + 60                   # a bound for a loaded machine, not a timing check
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive()
    fn, info = denoiser.compiled_call(tiny_ckpt, np.zeros((1, 3, 32, 32), np.float32), t, limit_s=3600)
    assert fn is None and info["compile_status"].startswith("failed: TorchRuntimeError"), info


def test_sampling_section_labels_extrapolated_rows(tmp_path: Path) -> None:
    sampling.run(tmp_path, models=(("tiny", 32, False),), batch=1, measure_steps=1)
    rows = json.loads((tmp_path / "sampling.json").read_text())["rows"]
    assert {r["backend"] for r in rows} == {"ort", "torch"}
    assert sum(r["how"] == "measured" for r in rows) == 2
    ddpm = next(r for r in rows if r["sampler"] == "ddpm" and r["backend"] == "ort")
    assert ddpm["steps"] == 100 and ddpm["how"].startswith("extrapolated")
    assert not any(r["steps"] == 250 for r in rows)                # ddim 250 > T = 100


def test_accuracy_section_on_fixture_checkpoint(tmp_path: Path, tiny_ckpt: Path) -> None:
    accuracy.run(tmp_path, ckpt=tiny_ckpt, n=2, steps=(5, 20, 100), clips=(True,))
    doc = json.loads((tmp_path / "accuracy.json").read_text())
    by = {(r["sampler"], r["grid"], r["steps"]): r for r in doc["rows"]}
    assert by[("ddim", None, 5)]["rmse"] > by[("ddim", None, 100)]["rmse"] == 0   # the T-step run is the reference
    assert {g for s, g, _ in by if s == "dpmpp-2m"} == set(TIME_GRIDS)
    assert [r["grid"] for r in doc["rows"] if r["default_grid"]] == ["logsnr", "logsnr", "time-uniform"]
    diff = by[("diffusers default", "linspace", 5)]
    assert len(diff["per_image"]) == 2 and diff["sd"] >= 0
    if importlib.util.find_spec("diffusers") is None:       # the column still comes, labelled as what it is
        assert "diffusers not installed" in diff["how"]
        assert diff["rmse"] == by[("dpmpp-2m", "linspace", 5)]["rmse"]
    assert [(r["steps"], r["grid"]) for r in doc["summary"]] == [(5, "logsnr"), (20, "logsnr"), (100, "time-uniform")]
    assert doc["goal"]["steps"] == 20 and isinstance(doc["goal"]["vs_diffusers_met"], bool)
    assert "diffusers default" in (tmp_path / "accuracy.md").read_text()
    assert (tmp_path / "accuracy.png").is_file()


def test_accuracy_summary_compares_default_grid_with_diffusers() -> None:
    def row(sampler: str, grid: str | None, rmse: float, per: list[float], default: bool = False) -> dict:
        return {"model": "m", "clip_x0": True, "steps": 10, "sampler": sampler, "grid": grid, "rmse": rmse,
                "sd": 0.0, "per_image": per, "default_grid": default}
    rows = [row("ddim", None, 0.05, [0.05, 0.05]), row("dpmpp-2m", "time-quadratic", 0.04, [0.01, 0.07]),
            row("dpmpp-2m", "logsnr", 0.02, [0.01, 0.03], True), row("diffusers default", "linspace", 0.03, [0.02, 0.02])]
    (s,) = accuracy.summary(rows)
    assert s["grid"] == "logsnr" and s["ok"] and s["images_at_least_as_close"] == "50%"
    rows[2]["rmse"] = 0.031
    assert not accuracy.summary(rows)[0]["ok"]


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


def test_gpu_sampling_rows_run_on_cpu() -> None:
    """bench gpu's step and end-to-end rows, executed on ORT's CPU provider with NumPy: every NumPy
    row of the plan is timed (each ratio = the baseline's time / the row's), the CuPy and graph
    rows say why not. (fp16 plain numpy is added so that a ratio is not the baseline's own.)"""
    arts = common.fresh_artifacts("tiny", [], ("fp32", "fp16"))
    extra = (("fp16", "off", "numpy"),)
    step = gpu_sampling.step_rows(arts, "tiny", 32, 2, 2, 1.0, provider="cpu", plan=gpu_sampling.STEP_PLAN + extra)
    e2e = gpu_sampling.e2e_rows(arts, "tiny", 32, batch=2, steps=2, repeats=1, provider="cpu",
                                plan=gpu_sampling.E2E_PLAN + extra)
    for rows, key, ratio in ((step, "median_ms", "vs_ort_fp32_numpy"),
                             (e2e, "s_per_image", "speedup_vs_ort_fp32_numpy")):
        by = {r["variant"]: r for r in rows}
        assert len(by) == 7 and {r["provider"] for r in rows} == {"cpu"}
        timed = {v for v, r in by.items() if key in r}
        assert timed == {"fp32 plain numpy", "fp16 plain numpy"}, rows
        base = by["fp32 plain numpy"][key]
        for v in timed:
            r = by[v]
            assert r[key] > 0 and r["images_per_s"] > 0 and "skipped" not in r
            assert r[ratio] == pytest.approx(base / r[key], abs=6e-4)             # rounded to 3 places
        for v in set(by) - timed:
            want = "--cuda-graph on needs --provider cuda" if "graph" in v else "--arrays cupy needs a GPU provider"
            assert want in by[v]["skipped"] and key not in by[v], by[v]
    for r in step:
        if "median_ms" in r:
            assert r["vs_torch_eager_fp32"] == pytest.approx(1.0 / r["median_ms"], abs=6e-4)
    assert all(r["first_batch_s"] >= 0 and r["session_s"] >= 0 for r in e2e if "s_per_image" in r)


@pytest.mark.filterwarnings("ignore:Specified provider .CUDAExecutionProvider.:UserWarning")  # the fallback under test
def test_gpu_ort_sessions_refuse_cpu_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU build of onnxruntime lists the CUDA provider even where its libraries cannot load, and
    then runs the session on CPU: bench gpu must record that variant as not measured, not time the
    CPU under `ort_cuda`. (Listing the provider is the stand-in here; the session and its fallback
    are real.)"""
    import onnxruntime as ort
    arts = common.fresh_artifacts("tiny", [], ("fp32",))
    x, t = np.zeros((1, 1, 32, 32), np.float32), np.full((1,), 10, np.int64)
    calls, skipped = gpu.ort_calls(arts["fp32"], x, t, ("cpu",))
    assert list(calls) == ["ort_cpu"] and not skipped and calls["ort_cpu"]()[0].shape == x.shape
    real = ort.get_available_providers()
    if "CUDAExecutionProvider" in real:
        pytest.skip("onnxruntime-gpu present: its sessions really run on CUDA")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real])
    calls, skipped = gpu.ort_calls(arts["fp32"], x, t, ("cuda", "tensorrt"))
    assert not calls and set(skipped) == {"ort_cuda", "ort_tensorrt"}
    assert "could not load CUDAExecutionProvider and would run on CPUExecutionProvider" in skipped["ort_cuda"]
    assert "tensorrt" in skipped["ort_tensorrt"] and "not available" in skipped["ort_tensorrt"]


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
