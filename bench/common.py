"""Shared benchmark plumbing: machine info, interleaved A/B timing, result writers, artifacts.

Every section returns a dict with "rows" (flat dicts) plus notes; `write_section` adds
machine info and writes <section>.json (atomically) and <section>.md.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import signal
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cxr_ddpm.runtime.fsutil import atomic_path, atomic_write

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / "cache"
PACKAGES = ("torch", "onnxruntime", "onnx", "numpy", "deepspeed", "denoising-diffusion-pytorch",
            "onnxslim", "matplotlib", "tensorrt", "onnxruntime-gpu")


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, GPU, load and library versions: what a reader needs to compare."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = None
    try:
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        ram = round(kb / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    gpu = None
    try:
        import torch
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            gpu = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                   "count": torch.cuda.device_count()}
    except ImportError:
        pass
    return {"busy_processes": busy_processes(), "cpu": cpu, "cores_logical": os.cpu_count(), "cpu_allowance": len(os.sched_getaffinity(0)),
            "ram_gib": ram, "gpu": gpu, "platform": platform.platform(),
            "load_avg_1_5_15": [round(v, 2) for v in os.getloadavg()], "versions": versions,
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def busy_processes(min_cpu: float = 20.0) -> list[str]:
    """Other processes using CPU while we measure (a 2-core machine is easily shared)."""
    import subprocess
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    except OSError:
        return []
    mine = {os.getpid(), os.getppid()}
    busy = []
    for line in out.splitlines()[1:]:
        pid, pcpu, args = (line.split(None, 2) + [""])[:3]
        if int(pid) not in mine and float(pcpu) >= min_cpu:
            busy.append(f"{pid} {pcpu}% {args[:80]}")
    return busy[:8]


def stats(ms: Sequence[float]) -> dict[str, float]:
    a = np.asarray(ms, dtype=float)
    return {"median_ms": round(float(np.median(a)), 3), "p90_ms": round(float(np.percentile(a, 90)), 3),
            "n": int(a.size)}


def interleaved(calls: dict[str, Callable[[], object]], *, runs: int = 10, min_runs: int = 2,
                budget_s: float | None = None, warmup: int = 1) -> dict[str, dict[str, float]]:
    """Median/p90 ms per variant, timed in rounds where every variant runs once, in rotating order.

    Rotation means no variant is always first (cache-warm) or last, and slow drift of the
    machine (other load, thermal) lands on all variants alike. With `budget_s`, the
    warm-up's duration estimates one round and the round count shrinks (not below
    `min_runs`) so the cell fits the budget; the n actually used is in the result.
    """
    keys = list(calls)
    t0 = time.perf_counter()
    for _ in range(warmup):
        for k in keys:
            calls[k]()
    round_s = (time.perf_counter() - t0) / max(warmup, 1)
    if budget_s is not None and round_s > 0:
        runs = max(min(min_runs, runs), min(runs, int(budget_s / round_s)))
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(runs):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            t = time.perf_counter()
            calls[k]()
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: stats(v) for k, v in times.items()}


def md_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Markdown table of `rows` with (key, header) columns; floats get 3 significant-ish digits."""
    def fmt(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)
    out = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(out) + "\n"


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    with atomic_write(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)
        f.write("\n")
    return path


def write_section(out: Path, name: str, doc: dict[str, Any], markdown: str) -> Path:
    """<out>/<name>.json (with machine info) and <out>/<name>.md; returns the JSON path."""
    doc = {"section": name, "machine": machine_info(), **doc}
    write_json(out / f"{name}.json", doc)
    with atomic_write(out / f"{name}.md", "w") as f:
        f.write(markdown)
    print(markdown, flush=True)
    return out / f"{name}.json"


def save_png(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def figure(w: float = 7, h: float = 4, ncols: int = 1) -> tuple[Any, Any]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(1, ncols, figsize=(w, h))


def config_key(cfg: Any, *extra: str) -> str:
    """Short hash of a Config (and extras): cache key for checkpoints and exports."""
    text = json.dumps(cfg.to_dict() if hasattr(cfg, "to_dict") else repr(cfg), sort_keys=True, default=str)
    return hashlib.sha256("|".join([text, *extra]).encode()).hexdigest()[:12]


def fresh_artifacts(name: str, overrides: Sequence[str] = (), precisions: Sequence[str] = ("fp32",),
                    cache: Path | None = None) -> dict[str, Path]:
    """Seeded, freshly initialised checkpoint of configs/<name>.yaml and its ONNX exports.

    Latency does not depend on the weights, so these are cached by config hash and
    reused across runs (export of the cxr128 U-Net takes tens of seconds).
    """
    import torch

    from cxr_ddpm.export.onnx_export import export_onnx
    from cxr_ddpm.train.config import load_config
    from cxr_ddpm.train.checkpoint import save_checkpoint
    from cxr_ddpm.train.model import build_unet

    cfg = load_config(ROOT / "configs" / f"{name}.yaml", list(overrides))
    work = (cache or CACHE) / f"fresh-{name}-{config_key(cfg, torch.__version__)}"
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "model.safetensors"
    if not ckpt.is_file():
        torch.manual_seed(0)
        sd = build_unet(cfg.model).state_dict()
        save_checkpoint(ckpt, cfg=cfg, step=0, class_names=[], ema=sd, online=None)
    out = {"ckpt": ckpt}
    for p in precisions:
        path = work / f"model.{p}.onnx"
        if not path.is_file():
            export_onnx(ckpt, path, precision=p, verify=False, log=lambda m: None)
        out[p] = path
    return out


def run_child(cmd: Sequence[str], timeout_s: float, log: Path) -> tuple[str, int | None, float]:
    """(ok | failed | timeout, exit code, seconds); stdout and stderr go to `log`. The child leads
    its own session: on timeout, and after it ends (stray workers), its whole group is killed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "10"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                             env=env, start_new_session=True)
        rc: int | None = None
        try:
            rc = p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        finally:                       # also when the check itself is stopped (SIGTERM, Ctrl-C)
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()
    seconds = round(time.perf_counter() - t0, 1)
    return ("timeout" if rc is None else "ok" if rc == 0 else "failed"), rc, seconds
