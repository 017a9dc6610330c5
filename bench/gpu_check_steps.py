"""What `python -m bench gpu-check` runs: the environment probe, the capabilities it implies, the
steps (commands, limits, what each needs) and the key figures read back from each step's output.

Every step is a command line run in a child process (bench/gpu_check.py runs them); nothing here
imports torch or touches a GPU except the probe, which runs in its own child:
`python -m bench.gpu_check_steps probe` prints a JSON line, then (on CUDA, after measuring the
matmul peak and the FLOPs that MFU needs) a fuller one.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

CONFIG = "configs/cxr128.yaml"
DATA = "data/cxr-sample"
TRAIN_STEPS = 60
SAMPLE = ["-n", "8", "--batch-size", "8", "--steps", "10", "--seed", "0", "--format", "npy"]
PACKAGES = ("torch", "onnxruntime", "onnxruntime-gpu", "onnx", "tensorrt", "cupy-cuda13x", "deepspeed",
            "denoising-diffusion-pytorch", "numpy", "pytest")
NEEDED = {"train": ("torch", "deepspeed", "denoising_diffusion_pytorch", "safetensors", "onnx"),
          "pytest": ("pytest",)}
Figures = Callable[[str, Path, dict[str, Any]], dict[str, Any]]     # (log text, out folder, environment)


@dataclass(frozen=True)
class Step:
    name: str
    what: str                          # one line: what the step verifies
    cmd: tuple[str, ...]
    timeout_s: int
    needs: tuple[str, ...] = ()        # capabilities (see `capabilities`)
    after: tuple[str, ...] = ()        # steps that must have succeeded first
    figures: Figures | None = None


# -----------------------------------------------------------------------------
# the environment: probed in a child (torch, CUDA, ORT, TensorRT, CuPy imports can crash or hang)

def nvidia_smi() -> dict[str, Any]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"error": "nvidia-smi not found"}
    try:
        rows = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=15)
        head = subprocess.run([exe], capture_output=True, text=True, timeout=15).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"nvidia-smi: {e}"}
    if rows.returncode != 0 or not rows.stdout.strip():
        return {"error": " ".join((rows.stdout + rows.stderr).split())[:200] or f"nvidia-smi exit {rows.returncode}"}
    gpus = [dict(zip(("name", "driver", "memory"), (p.strip() for p in line.split(","))))
            for line in rows.stdout.strip().splitlines()]
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", head)
    return {"gpus": gpus, "driver": gpus[0].get("driver"), "driver_cuda": cuda.group(1) if cuda else None}


def probe() -> dict[str, Any]:
    """Versions, devices and what can run. Each part is guarded: one failing import is recorded."""
    info: dict[str, Any] = {"python": platform.python_version(), "nvidia_smi": nvidia_smi(), "versions": {}}
    for pkg in PACKAGES:
        try:
            info["versions"][pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info["versions"][pkg] = None
    info["missing_modules"] = sorted({m for mods in NEEDED.values() for m in mods
                                      if importlib.util.find_spec(m) is None})
    try:
        import torch
        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if info["cuda_available"]:
            p = torch.cuda.get_device_properties(0)
            info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                        capability=f"{p.major}.{p.minor}", cudnn=torch.backends.cudnn.version())
    except Exception as e:  # noqa: BLE001 - recorded: the report says what could not be probed
        info["torch_error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    try:
        import onnxruntime as ort
        info.update(onnxruntime=ort.__version__, ort_providers=list(ort.get_available_providers()))
    except Exception as e:  # noqa: BLE001
        info["onnxruntime_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    try:
        import tensorrt
        info["tensorrt"] = tensorrt.__version__
    except Exception as e:  # noqa: BLE001 - ImportError, or a wheel whose libnvinfer is a stub
        info["tensorrt_error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
    from cxr_ddpm.runtime.backends.ort_cuda import cupy_problem
    info["cupy_problem"] = cupy_problem()
    return info


def mfu_inputs(info: dict[str, Any]) -> dict[str, Any]:
    """On CUDA: the measured bf16 matmul peak and the training model's forward FLOPs per image."""
    if not info.get("cuda_available"):
        return {}
    from .common import fresh_artifacts
    from .denoiser import flops_per_image
    from .gpu import bf16_peak_tflops
    ckpt = fresh_artifacts(Path(CONFIG).stem, [], ())["ckpt"]          # FLOPs do not depend on weights
    return {"bf16_peak_tflops": round(bf16_peak_tflops(), 1),
            "train_gflops_per_image": round(flops_per_image(ckpt, 128) / 1e9, 3)}


def capabilities(info: dict[str, Any] | None, why_no_info: str = "") -> dict[str, str | None]:
    """capability -> None when present, else why not (one line). Pure: tested on CPU."""
    names = ("gpu", "ort_cuda", "tensorrt", "cupy", "train", "pytest")
    if info is None:
        return {n: f"environment probe {why_no_info}" for n in names}
    smi = info.get("nvidia_smi") or {}
    gpu = None
    if not info.get("cuda_available"):
        torch_says = (info.get("torch_error") or f"torch {info.get('torch')} "
                      + ("is a CPU build" if info.get("torch_cuda") is None else "sees no CUDA device"))
        gpu = f"no CUDA device: {smi['error']}; {torch_says}" if smi.get("error") else f"no CUDA device: {torch_says}"
    ort = None
    if "CUDAExecutionProvider" not in (info.get("ort_providers") or []):
        ort = (info.get("onnxruntime_error") or
               f"onnxruntime {info.get('onnxruntime')} has no CUDAExecutionProvider (onnxruntime-gpu is not "
               "installed; ../shared/notes/gpu-device.md says how to bring it)")
    missing = set(info.get("missing_modules") or [])

    def extra(name: str) -> str | None:
        gone = [m for m in NEEDED[name] if m in missing]
        return f"{', '.join(gone)} not installed" if gone else None
    return {"gpu": gpu, "ort_cuda": ort,
            "tensorrt": None if info.get("tensorrt") else f"TensorRT not installed ({info.get('tensorrt_error')})",
            "cupy": info.get("cupy_problem"), "train": extra("train"), "pytest": extra("pytest")}


# -----------------------------------------------------------------------------
# key figures, read from each step's log and files

def last_json_line(text: str) -> dict[str, Any] | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def pytest_figures(log: str, out: Path, env: dict[str, Any]) -> dict[str, Any]:
    """Counts, failed test ids and skip reasons from the JUnit XML."""
    import xml.etree.ElementTree as ET
    try:
        root = ET.parse(out / "pytest-gpu.xml").getroot()
    except (OSError, ET.ParseError):
        return {}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {}
    failed: list[str] = []
    skipped: dict[str, int] = {}
    for case in suite.iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        skip = case.find("skipped")
        if skip is not None:
            why = skip.get("message", "")
            skipped[why] = skipped.get(why, 0) + 1
    n = int(suite.get("tests", 0))
    return {"tests": n, "passed": n - len(failed) - sum(skipped.values()), "failed": failed,
            "skipped": skipped}


def train_figures(log: str, out: Path, env: dict[str, Any]) -> dict[str, Any]:
    """images/s, MFU (3 x forward FLOPs per image), peak memory, loader wait, saves and grids."""
    run = out / "train"
    try:
        summary = json.loads((run / "summary.json").read_text())
        with open(run / "log.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, ValueError):
        return {}
    waits = sorted(float(r["data_wait_pct"]) for r in rows[1:] or rows)   # the first row holds start-up
    ips = float(summary["images_per_s"])
    fig: dict[str, Any] = {
        "steps": summary.get("step"), "precision": summary.get("precision"), "zero_stage": summary.get("zero_stage"),
        "global_batch": summary.get("global_batch"), "images_per_s": round(ips, 1),
        "peak_mem_gib": round(float(summary["peak_mem_mib"]) / 1024, 2),
        "data_wait_pct": round(waits[len(waits) // 2], 1) if waits else None,
        "checkpoints": len(list((run / "checkpoints").glob("*.safetensors"))),
        "sample_grids": len(list((run / "samples").glob("*.png")))}
    gflops, peak = env.get("train_gflops_per_image"), env.get("bf16_peak_tflops")
    if gflops and peak:
        fig["mfu_vs_bf16_peak"] = round(3 * gflops * 1e9 * ips / (peak * 1e12), 4)
    return fig


def export_figures(path: Path) -> Figures:
    """Size and what the file's own metadata says (not the log line, whose wording may change)."""
    def figures(log: str, out: Path, env: dict[str, Any]) -> dict[str, Any]:
        from cxr_ddpm.runtime.contract.metadata import read_onnx_metadata
        meta = read_onnx_metadata(path)
        return {"mb": round(path.stat().st_size / 1e6, 2), "precision": meta.get("precision"),
                "exporter": meta.get("exporter"), "opset": meta.get("opset"),
                "from_step": (meta.get("source") or {}).get("step")}
    return figures


def verify_figures(log: str, out: Path, env: dict[str, Any]) -> dict[str, Any]:
    """The worst row of the parity table (ok or not): error relative to the output std, max abs."""
    m = re.search(r"worst error ([\d.e+-]+) x output std \(max abs ([\d.e+-]+)\).*tolerance ([\d.e+-]+)", log)
    return {"worst_rel": float(m.group(1)), "max_abs": float(m.group(2)), "tolerance": float(m.group(3))} if m else {}


def file_figures(path: Path) -> Figures:
    def figures(log: str, out: Path, env: dict[str, Any]) -> dict[str, Any]:
        return {"mb": round(path.stat().st_size / 1e6, 2)} if path.is_file() else {}
    return figures


def sample_figures(folder: str) -> Figures:
    """images/s and the path the record says was taken; for CUDA runs the agreement with the CPU
    images (same request, same seed): max and mean |difference| in [-1, 1] units."""
    def figures(log: str, out: Path, env: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        here = out / "samples" / folder
        try:
            rec = json.loads((here / "samples.json").read_text())
        except (OSError, ValueError):
            return {}
        fig: dict[str, Any] = {"images_per_s": rec.get("images_per_s"), "provider": rec.get("provider"),
                               "arrays": rec.get("arrays"), "cuda_graph": rec.get("cuda_graph")}
        cpu = out / "samples" / "cpu"
        mine = sorted(here.glob("*.npy"))
        if folder != "cpu" and mine and all((cpu / p.name).is_file() for p in mine):
            diff = np.stack([np.abs(np.load(p).astype(np.float64) - np.load(cpu / p.name)) for p in mine])
            fig.update(vs_cpu_max_abs=float(f"{diff.max():.3g}"), vs_cpu_mean_abs=float(f"{diff.mean():.3g}"))
        return fig
    return figures


def bench_figures(log: str, out: Path, env: dict[str, Any]) -> dict[str, Any]:
    try:
        doc = json.loads((out / "bench" / "gpu.json").read_text())
    except (OSError, ValueError):
        return {}
    rows = doc.get("rows", []) + doc.get("sampling_step_rows", []) + doc.get("sampling_e2e_rows", [])
    return {"status": doc.get("status"), "sampling_status": doc.get("sampling_status"),
            "rows_measured": sum("skipped" not in r for r in rows),
            "rows_not_measured": sorted({f"{r['variant']}: {r['skipped']}" for r in rows if "skipped" in r})}


# -----------------------------------------------------------------------------
# the plan: limits sum to at most 8 minutes (the GPU machine's sessions are short)

def plan(out: Path, py: str = sys.executable) -> list[Step]:
    train, onnx, smp = out / "train", out / "onnx", out / "samples"
    fp32, fp16, engine = onnx / "cxr128.fp32.onnx", onnx / "cxr128.fp16.onnx", onnx / "cxr128.fp16.engine"
    export, runtime = (py, "-m", "cxr_ddpm.export.cli"), (py, "-m", "cxr_ddpm.runtime.cli")
    sets = [f"train.steps={TRAIN_STEPS}", "train.save_every=30", "train.sample_every=40", "train.sample_steps=10",
            "train.log_every=10", "train.warmup_steps=10"]
    steps = [
        Step("pytest-gpu", "the GPU and TensorRT tests", (
            py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "(gpu or tensorrt) and not slurm",
            "--junitxml", str(out / "pytest-gpu.xml"), "tests"), 75, ("gpu", "pytest"), figures=pytest_figures),
        Step("train", f"cxr-train fit {CONFIG} (128 px, bf16, ZeRO-2), {TRAIN_STEPS} steps with a sample grid "
             "and saves inside", (py, "-m", "cxr_ddpm.train.cli", "fit", "--config", CONFIG, "--data", DATA,
                                  "--out", str(train), *(a for s in sets for a in ("--set", s))),
             80, ("gpu", "train"), figures=train_figures),
        Step("export-fp32", "cxr-export onnx fp32", (*export, "onnx", "--ckpt", str(train), "--out", str(fp32),
                                                     "--no-verify"), 30, ("train",), ("train",), export_figures(fp32)),
        Step("export-fp16", "cxr-export onnx fp16", (*export, "onnx", "--ckpt", str(train), "--out", str(fp16),
                                                     "--precision", "fp16", "--no-verify"),
             30, ("train",), ("train",), export_figures(fp16)),
        Step("verify-cuda-fp32", "cxr-export verify --provider cuda (fp32 ONNX vs PyTorch)",
             (*export, "verify", str(fp32), "--ckpt", str(train), "--provider", "cuda"),
             15, ("gpu", "ort_cuda", "train"), ("export-fp32",), verify_figures),
        Step("verify-cuda-fp16", "cxr-export verify --provider cuda (fp16 ONNX vs PyTorch)",
             (*export, "verify", str(fp16), "--ckpt", str(train), "--provider", "cuda"),
             15, ("gpu", "ort_cuda", "train"), ("export-fp16",), verify_figures),
        Step("trt-build", "cxr-export trt of the fp16 ONNX", (
            *export, "trt", "--onnx", str(fp16), "--out", str(engine), "--timing-cache", str(onnx / "trt.cache")),
             45, ("gpu", "tensorrt"), ("export-fp16",), file_figures(engine)),
        Step("trt-verify", "cxr-export verify of the engine (parity with PyTorch)", (
            *export, "verify", str(engine), "--ckpt", str(train), "--onnx", str(fp16)),
             15, ("gpu", "tensorrt", "train"), ("trt-build",), verify_figures),
        Step("sample-cpu", "cxr-runtime sample --provider cpu: the reference images",
             (*runtime, "sample", "--engine", str(fp32), *SAMPLE, "--provider", "cpu", "--out", str(smp / "cpu")),
             20, (), ("export-fp32",), sample_figures("cpu"))]
    for graph in ("on", "off"):
        for arrays in ("cupy", "numpy"):
            name = f"cuda-graph-{graph}-{arrays}"
            steps.append(Step(
                f"sample-{name}", f"cxr-runtime sample --provider cuda --cuda-graph {graph} --arrays {arrays}, "
                "vs the CPU images", (*runtime, "sample", "--engine", str(fp32), *SAMPLE, "--provider", "cuda",
                                      "--cuda-graph", graph, "--arrays", arrays, "--out", str(smp / name)),
                12, ("gpu", "ort_cuda", *(("cupy",) if arrays == "cupy" else ())), ("export-fp32",),
                sample_figures(name)))
    steps.append(Step("bench-gpu", "python -m bench gpu --check (denoiser and runtime sampling on CUDA)",
                      (py, "-m", "bench", "gpu", "--check", "--out", str(out / "bench")), 75, ("gpu", "train"),
                      figures=bench_figures))
    return steps


PROBE_TIMEOUT_S = 30


def budget_s(steps: list[Step]) -> int:
    return PROBE_TIMEOUT_S + sum(s.timeout_s for s in steps)


if __name__ == "__main__":          # the probe child: python -m bench.gpu_check_steps probe
    if sys.argv[1:] != ["probe"]:
        sys.exit("usage: python -m bench.gpu_check_steps probe")
    found = probe()
    print(json.dumps(found, default=str), flush=True)   # first: what a probe cut short still reports
    print(json.dumps({**found, **mfu_inputs(found)}, default=str), flush=True)
