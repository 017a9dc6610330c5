"""`make gpu-check` (python -m bench gpu-check) on a CPU machine: every step skips with its reason and
the report keeps its schema; the runner with real processes (a failure, a timeout whose process tree
is killed, the steps that depend on them, a probe that breaks); the key figures read back from the
real outputs of the steps' own commands, run here with the CPU provider."""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import gpu_check  # noqa: E402
from bench import gpu_check_steps as gcs  # noqa: E402
from bench.gpu_check_steps import Step  # noqa: E402

REPORT_KEYS = {"kind", "schema", "out", "git_commit", "started_utc", "budget_s", "limit_s", "seconds", "probe",
               "environment", "capabilities", "steps", "summary", "could_not_run"}
STEP_KEYS = {"name", "what", "status", "reason", "seconds", "timeout_s", "cmd", "log", "figures"}
PY = sys.executable


def stub_probe(info: dict, then: str = "") -> tuple[str, ...]:
    """A probe child printing `info` (what a machine without CUDA reports), then running `then`."""
    return (PY, "-c", f"import json, sys, time; print(json.dumps({info!r}), flush=True); {then or 'pass'}")


CPU_INFO = {"cuda_available": False, "torch": "2.0+cpu", "torch_cuda": None, "missing_modules": [],
            "ort_providers": ["CPUExecutionProvider"], "onnxruntime": "1.0", "cupy_problem": "CuPy is not installed"}


def test_cpu_run_skips_every_step_with_its_reason(tmp_path: Path) -> None:
    import torch
    if torch.cuda.is_available() or shutil.which("nvidia-smi"):
        pytest.skip("a GPU machine: the steps run there")
    out = tmp_path / "check"
    p = subprocess.run([PY, "-m", "bench", "gpu-check", "--out", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    doc = json.loads((out / "gpu-check.json").read_text())
    assert set(doc) == REPORT_KEYS and doc["kind"] == "cxr-ddpm gpu-check" and doc["schema"] == 1
    plan = gcs.plan(Path(doc["out"]))
    assert doc["budget_s"] == gcs.PROBE_TIMEOUT_S + sum(s.timeout_s for s in plan) <= doc["limit_s"] == 480
    assert doc["probe"]["status"] == "ok" and doc["git_commit"]
    env = doc["environment"]
    assert env["torch"] == torch.__version__ and env["onnxruntime"] and env["python"] and "tensorrt" in env["versions"]
    caps = doc["capabilities"]
    no_gpu = caps["gpu"]
    assert no_gpu.startswith("no CUDA device: nvidia-smi not found; torch") and "onnxruntime-gpu" in caps["ort_cuda"]
    assert caps["tensorrt"].startswith("TensorRT not installed") and caps["cupy"]
    assert caps["train"] is None and caps["pytest"] is None
    want = {"export-fp32": "needs step train (skipped)", "export-fp16": "needs step train (skipped)",
            "sample-cpu": "needs step export-fp32 (skipped)"}
    assert [r["name"] for r in doc["steps"]] == [s.name for s in plan]
    for r, step in zip(doc["steps"], plan):
        assert set(r) == STEP_KEYS and r["cmd"] == shlex.join(step.cmd) and r["timeout_s"] == step.timeout_s
        assert (r["status"], r["seconds"], r["log"], r["figures"]) == ("skipped", 0.0, None, {})
        assert r["reason"] == want.get(r["name"], no_gpu), r
    assert doc["summary"] == {"ok": 0, "failed": 0, "timeout": 0, "skipped": len(plan)}
    assert [c["step"] for c in doc["could_not_run"]] == [s.name for s in plan]
    md = (out / "gpu-check.md").read_text()
    assert md.startswith(f"# GPU check: 0 ok, 0 failed, 0 timed out, {len(plan)} skipped")
    assert all(f"| {s.name} | skipped | 0.0 | {s.timeout_s} |" in md for s in plan)
    assert "## Not available on this machine" in md and f"- gpu: {no_gpu}" in md and "- tensorrt: TensorRT" in md
    assert md in p.stdout
    assert sorted(os.listdir(out)) == ["gpu-check.json", "gpu-check.md", "logs"]         # no temp files left


def test_plan_trains_as_the_issue_asks() -> None:
    """128 px, bf16, ZeRO-2, about 60 steps, a sample grid and a save inside the run."""
    from cxr_ddpm.train.config import load_config
    train = next(s for s in gcs.plan(Path("/x")) if s.name == "train")
    sets = [train.cmd[i + 1] for i, a in enumerate(train.cmd) if a == "--set"]
    cfg = load_config(ROOT / train.cmd[train.cmd.index("--config") + 1], sets)
    t = cfg.train
    assert (cfg.model.image_size, t.precision, t.zero_stage, t.steps) == (128, "bf16", 2, 60)
    assert 0 < t.sample_every < t.steps and 0 < t.save_every < t.steps


@pytest.mark.parametrize("content", ["file", "folder"])
def test_out_must_be_new_or_empty(tmp_path: Path, content: str) -> None:
    out = tmp_path / "out"
    if content == "file":
        out.write_text("")
    else:
        (out / "train").mkdir(parents=True)
    p = subprocess.run([PY, "-m", "bench", "gpu-check", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [f"error: --out {out}: not an empty folder (an earlier check?); "
                                             "give a new or empty one"]
    assert not (tmp_path / "out" / "gpu-check.json").exists() if content == "folder" else out.read_text() == ""


def test_runner_records_failure_timeout_and_dependents(tmp_path: Path) -> None:
    """Real children: a failure keeps its error line, a hang is cut off with its whole process
    group (a grandchild too), the steps after either are skipped naming them, the others run; a
    figures parser that raises is recorded without losing the report."""
    pidfile = tmp_path / "grandchild.pid"
    hang = (PY, "-c", "import subprocess, sys, time; "
            "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            f"open({str(pidfile)!r}, 'w').write(str(g.pid)); time.sleep(600)")

    def broken_parser(log: str, out: Path, env: dict) -> dict:
        raise ValueError("parser bug")
    steps = [
        Step("ok", "writes a file", (PY, "-c", f"open({str(tmp_path / 'x.bin')!r}, 'wb').write(bytes(1500000))"), 60,
             figures=gcs.file_figures(tmp_path / "x.bin")),
        Step("fails", "exits 2", (PY, "-c", "import sys; print('progress'); "
                                  "print('error: x.onnx: broken', file=sys.stderr); sys.exit(2)"), 60),
        Step("hangs", "never ends", hang, 3),
        Step("after-fails", "", (PY, "-c", "pass"), 60, after=("fails",)),
        Step("after-hangs", "", (PY, "-c", "pass"), 60, after=("hangs",)),
        Step("after-ok", "", (PY, "-c", "pass"), 60, after=("ok",), figures=broken_parser),
        Step("needs-gpu", "", (PY, "-c", "pass"), 60, needs=("gpu",)),
    ]
    out = tmp_path / "out"
    report = gpu_check.run_check(out, steps, probe_cmd=stub_probe(CPU_INFO), log=lambda m: None)
    by = {r["name"]: r for r in report["steps"]}
    assert by["ok"]["status"] == "ok" and by["ok"]["figures"] == {"mb": 1.5} and by["ok"]["reason"] is None
    assert (by["fails"]["status"], by["fails"]["reason"]) == ("failed", "exit 2: error: x.onnx: broken")
    assert "progress" in (out / by["fails"]["log"]).read_text()
    assert (by["hangs"]["status"], by["hangs"]["reason"]) == ("timeout",
                                                              "exceeded its 3 s limit (process group killed)")
    if pidfile.is_file():                                  # the grandchild got that far: it must be gone
        for _ in range(50):                                # SIGKILL is delivered at once; reaping by init may lag
            stat = Path(f"/proc/{pidfile.read_text()}/stat")
            if not stat.exists() or stat.read_text().split(") ")[1][0] == "Z":
                break
            time.sleep(0.1)
        assert not stat.exists() or stat.read_text().split(") ")[1][0] == "Z"
    assert by["after-fails"]["reason"] == "needs step fails (failed)"
    assert by["after-hangs"]["reason"] == "needs step hangs (timeout)"
    assert by["after-ok"]["status"] == "ok" and by["after-ok"]["figures"] == {"error": "ValueError: parser bug"}
    assert by["needs-gpu"]["reason"] == "no CUDA device: torch 2.0+cpu is a CPU build"
    assert report["summary"] == {"ok": 2, "failed": 1, "timeout": 1, "skipped": 3}
    assert json.loads((out / "gpu-check.json").read_text()) == json.loads(json.dumps(report))
    assert "| hangs | timeout |" in (out / "gpu-check.md").read_text()


def test_probe_cut_short_or_broken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe that hangs after its first line still informs the capabilities; one that dies
    leaves every capability 'environment probe failed: ...', so the GPU steps skip saying so."""
    monkeypatch.setattr(gpu_check, "PROBE_TIMEOUT_S", 3)
    steps = [Step("plain", "", (PY, "-c", "pass"), 60), Step("gpu", "", (PY, "-c", "pass"), 60, needs=("gpu",))]
    r = gpu_check.run_check(tmp_path / "a", steps, probe_cmd=stub_probe(CPU_INFO, "time.sleep(600)"),
                            log=lambda m: None)
    assert r["probe"]["status"] == "timeout" and r["environment"]["torch"] == "2.0+cpu"
    assert r["steps"][1]["reason"] == "no CUDA device: torch 2.0+cpu is a CPU build"
    r = gpu_check.run_check(tmp_path / "b", steps, probe_cmd=(PY, "-c", "import sys; sys.exit('ImportError: torch')"),
                            log=lambda m: None)
    why = "environment probe failed: exit 1: ImportError: torch"
    assert r["probe"]["status"] == "failed" and set(r["capabilities"].values()) == {why}
    assert [s["status"] for s in r["steps"]] == ["ok", "skipped"] and r["steps"][1]["reason"] == why


def test_capabilities_of_a_gpu_machine() -> None:
    full = {"cuda_available": True, "torch": "2.11+cu130", "torch_cuda": "13.0", "missing_modules": [],
            "ort_providers": ["CUDAExecutionProvider", "CPUExecutionProvider"], "onnxruntime": "1.31.1",
            "tensorrt": "10.13", "cupy_problem": None}
    assert set(gcs.capabilities(full).values()) == {None}
    bare = {**full, "ort_providers": ["CPUExecutionProvider"], "tensorrt": None, "missing_modules": ["deepspeed"],
            "tensorrt_error": "ModuleNotFoundError: No module named 'tensorrt'"}
    caps = gcs.capabilities(bare)
    assert caps["gpu"] is None and caps["train"] == "deepspeed not installed" and caps["pytest"] is None
    assert caps["ort_cuda"].startswith("onnxruntime 1.31.1 has no CUDAExecutionProvider (onnxruntime-gpu")
    assert caps["tensorrt"] == "TensorRT not installed (ModuleNotFoundError: No module named 'tensorrt')"


@pytest.mark.slow
def test_figures_from_the_steps_own_commands_on_cpu(tmp_path: Path, tiny_ckpt: Path, tiny_cfg,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan's export, verify and sample commands, run for a tiny checkpoint with the CPU
    provider in place of CUDA, and the figures read from what they wrote; training figures from a
    run folder written by the trainer's own RunLog; pytest's from a real JUnit file."""
    from cxr_ddpm.runtime.outputs.formats import grid_png
    from cxr_ddpm.train.runlog import RunLog
    out = (tmp_path / "check").resolve()
    run = out / "train"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_ckpt, run / "checkpoints" / "step_00000030.safetensors")
    log = RunLog(run, tiny_cfg, 0)
    for step, wait in ((10, 60.0), (20, 2.0), (30, 4.0), (40, 3.0)):      # the first row holds start-up
        log.row(step, 0.1, 1e-4, 1.0, 100.0, float(step), wait)
    log.close({"step": 40, "preempted": False, "images_per_s": 120.0, "peak_mem_mib": 2048.0, "world_size": 1,
               "zero_stage": 2, "precision": "bf16", "global_batch": 32})
    grid_png(run / "samples" / "step_00000040.png", [np.zeros((1, 8, 8), np.float32)])
    fig = gcs.train_figures("", out, {"train_gflops_per_image": 1.0, "bf16_peak_tflops": 100.0})
    assert fig == {"steps": 40, "precision": "bf16", "zero_stage": 2, "global_batch": 32, "images_per_s": 120.0,
                   "peak_mem_gib": 2.0, "data_wait_pct": 3.0, "checkpoints": 1, "sample_grids": 1,
                   "mfu_vs_bf16_peak": 0.0036}                              # 3 x 1 GFLOP x 120/s / 100 TFLOP/s

    def on_cpu(step: Step) -> Step:                  # the GPU machine's limits do not fit 2 shared cores
        return dataclasses.replace(step, cmd=tuple("cpu" if a == "cuda" else a for a in step.cmd), needs=(),
                                   after=tuple(a for a in step.after if a != "train"), timeout_s=600)
    names = ("export-fp32", "verify-cuda-fp32", "sample-cpu", "sample-cuda-graph-off-numpy")
    steps = [on_cpu(s) for s in gcs.plan(out) if s.name in names]
    report = gpu_check.run_check(out, steps, probe_cmd=stub_probe(CPU_INFO), log=lambda m: None)
    by = {r["name"]: r for r in report["steps"]}
    assert [by[n]["status"] for n in names] == ["ok"] * 4, report["steps"]
    exp, ver = by["export-fp32"]["figures"], by["verify-cuda-fp32"]["figures"]
    assert exp["precision"] == "fp32" and exp["mb"] > 0 and exp["exporter"] and exp["from_step"] == 0
    assert 0 <= ver["worst_rel"] <= ver["tolerance"] and ver["max_abs"] >= 0
    cpu, same = by["sample-cpu"]["figures"], by["sample-cuda-graph-off-numpy"]["figures"]
    assert cpu["images_per_s"] > 0 and (cpu["provider"], cpu["arrays"]) == ("cpu", "numpy")
    assert "vs_cpu_max_abs" not in cpu
    assert same["vs_cpu_max_abs"] == 0.0 and same["vs_cpu_mean_abs"] == 0.0     # same provider: the same images
    assert len(list((out / "samples" / "cpu").glob("*.npy"))) == 8

    tests = tmp_path / "test_three.py"
    tests.write_text("import pytest\ndef test_pass(): pass\ndef test_fail(): assert False\n"
                     "def test_skip(): pytest.skip('no TensorRT here')\n")
    gpu_check.run_child((PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml",
                         str(out / "pytest-gpu.xml"), str(tests)), 300, tmp_path / "pytest.log")
    fig = gcs.pytest_figures("", out, {})
    assert (fig["tests"], fig["passed"], [f.split("::")[1] for f in fig["failed"]]) == (3, 1, ["test_fail"])
    assert list(fig["skipped"].values()) == [1] and "no TensorRT here" in next(iter(fig["skipped"]))

    import torch
    if not torch.cuda.is_available():                   # bench gpu's own pending document
        from bench import common, gpu
        monkeypatch.setattr(common, "CACHE", tmp_path / "bench-cache")
        gpu.run(out / "bench", models=(("tiny", 32),))
        assert gcs.bench_figures("", out, {}) == {"status": "pending", "sampling_status": "pending",
                                                  "rows_measured": 0, "rows_not_measured": []}


def test_sigterm_kills_the_running_step_tree(tmp_path: Path) -> None:
    """The check stopped from outside (a job or device limit) takes the running step's process
    group with it: steps run in sessions of their own, so nothing else would."""
    pidfile = tmp_path / "grandchild.pid"
    hang = tmp_path / "hang.py"
    hang.write_text("import subprocess, sys, time\n"
                    "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
                    f"open({str(pidfile)!r}, 'w').write(str(g.pid))\ntime.sleep(600)\n")
    driver = tmp_path / "driver.py"
    driver.write_text("import sys\nfrom pathlib import Path\n"
                      f"sys.path.insert(0, {str(ROOT)!r})\n"
                      "from bench import gpu_check\nfrom bench.gpu_check_steps import Step\n"
                      "gpu_check.stop_on_sigterm()\n"
                      f"gpu_check.run_check(Path({str(tmp_path / 'out')!r}), [Step('hangs', '', (sys.executable, "
                      f"{str(hang)!r}), 600)], probe_cmd={stub_probe(CPU_INFO)!r}, log=lambda m: None)\n")
    p = subprocess.Popen([PY, str(driver)], cwd=ROOT)
    for _ in range(600):
        if pidfile.is_file() and pidfile.read_text():
            break
        time.sleep(0.1)
    else:
        p.kill()
        pytest.fail("the step never started its grandchild")
    p.send_signal(15)
    assert p.wait(timeout=60) == 143
    stat = Path(f"/proc/{pidfile.read_text()}/stat")
    for _ in range(50):
        if not stat.exists() or stat.read_text().split(") ")[1][0] == "Z":
            break
        time.sleep(0.1)
    assert not stat.exists() or stat.read_text().split(") ")[1][0] == "Z"
