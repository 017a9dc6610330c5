"""`python -m bench gpu-check --out DIR` (`make gpu-check OUT=DIR`): everything a GPU session must
verify, in one process tree, installing nothing; one report, DIR/gpu-check.json and .md.

    $ make gpu-check OUT=runs/gpu-check            # the lent GPU machine: bench/gpu_check_device.sh

The steps (bench/gpu_check_steps.py): the GPU and TensorRT tests; a 60-step cxr128 training run
(128 px, bf16, ZeRO-2) with a sample grid and saves inside it; fp32 and fp16 ONNX export and
`verify --provider cuda`; when TensorRT imports, an engine and its parity; `cxr-runtime sample`
on CUDA with graphs on/off and CuPy/NumPy arrays against the CPU images; `python -m bench gpu`.
Each is a child process in its own session with its own time limit: on expiry its whole process
group is killed and the step is recorded as timed out; a failed step is recorded with its last
error line; either way the rest still run. A step that needs a capability the machine lacks
(a GPU, onnxruntime-gpu, TensorRT, CuPy) or an earlier step that did not succeed is skipped with
the reason. The limits sum to at most 8 minutes. The report is rewritten after every step, so a
check cut short still leaves one. Exit 0 when nothing failed or timed out (skips included: the
report says what could not run and why), 1 otherwise.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.fsutil import atomic_write, ensure_writable_dir

from .common import run_child
from .gpu_check_steps import PROBE_TIMEOUT_S, Step, budget_s, capabilities, last_json_line, plan

ROOT = Path(__file__).resolve().parents[1]
LIMIT_S = 480                      # the sum of all step limits (one H100/H200 session)
SCHEMA = 1


def failure_reason(status: str, rc: int | None, timeout_s: float, log_text: str) -> str | None:
    """One line: the limit for a timeout; the error line (else the last line) for a failure."""
    if status == "timeout":
        return f"exceeded its {timeout_s:g} s limit (process group killed)"
    if status != "failed":
        return None
    lines = [ln.strip() for ln in log_text.replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:") or ln.startswith("FAILED ")]
    last = (errors or lines or ["(no output)"])[-1]
    how = f"killed by signal {-rc}" if rc is not None and rc < 0 else f"exit {rc}"
    return f"{how}: {last[:240]}"


def skip_reason(step: Step, caps: dict[str, str | None], done: dict[str, dict[str, Any]]) -> str | None:
    for need in step.needs:
        if caps.get(need):
            return caps[need]
    for name in step.after:
        status = done.get(name, {}).get("status", "not run")
        if status != "ok":
            return f"needs step {name} ({status})"
    return None


def git_commit() -> str:
    """CXR_GIT_COMMIT (the device machine gets a copy of the tree without .git), else git's."""
    if os.environ.get("CXR_GIT_COMMIT"):
        return os.environ["CXR_GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    if head.returncode != 0:
        return "unknown (no git repository here; set CXR_GIT_COMMIT)"
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def summarize(steps: list[dict[str, Any]]) -> dict[str, int]:
    return {s: sum(r["status"] == s for r in steps) for s in ("ok", "failed", "timeout", "skipped")}


def run_check(out: Path, steps: list[Step] | None = None, probe_cmd: Sequence[str] | None = None,
              log: Any = print) -> dict[str, Any]:
    """Probe, then every step in order; the report (also written to out/gpu-check.json + .md)."""
    out = out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    steps = plan(out) if steps is None else steps
    t_all = time.perf_counter()
    report: dict[str, Any] = {
        "kind": "cxr-ddpm gpu-check", "schema": SCHEMA, "out": str(out), "git_commit": git_commit(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "budget_s": budget_s(steps),
        "limit_s": LIMIT_S, "seconds": None, "environment": {}, "capabilities": {}, "steps": [],
        "summary": {}, "could_not_run": []}
    probe_log = out / "logs" / "probe.log"
    cmd = list(probe_cmd or [sys.executable, "-m", "bench.gpu_check_steps", "probe"])
    status, rc, seconds = run_child(cmd, PROBE_TIMEOUT_S, probe_log)
    text = probe_log.read_text(errors="replace")
    info = last_json_line(text)                     # a probe cut short may still have printed one
    if status == "ok" and info is None:
        status = "failed"
    why = ("printed no JSON line" if rc == 0 else failure_reason(status, rc, PROBE_TIMEOUT_S, text)) or ""
    report["probe"] = {"status": status, "seconds": seconds, "timeout_s": PROBE_TIMEOUT_S,
                       "log": "logs/probe.log", "reason": None if status == "ok" else why}
    report["environment"] = info or {}
    caps = report["capabilities"] = capabilities(info, f"{status}: {why}")
    log(f"gpu-check: probe {report['probe']['status']} in {seconds} s; missing: "
        + (", ".join(f"{k} ({v})" for k, v in caps.items() if v) or "nothing"))
    done: dict[str, dict[str, Any]] = {}
    for step in steps:
        rec: dict[str, Any] = {"name": step.name, "what": step.what, "status": "skipped", "reason": None,
                               "seconds": 0.0, "timeout_s": step.timeout_s, "cmd": shlex.join(step.cmd),
                               "log": None, "figures": {}}
        rec["reason"] = skip_reason(step, caps, done)
        if rec["reason"] is None:
            path = out / "logs" / f"{step.name}.log"
            status, rc, rec["seconds"] = run_child(step.cmd, step.timeout_s, path)
            text = path.read_text(errors="replace")
            rec.update(status=status, log=str(path.relative_to(out)),
                       reason=failure_reason(status, rc, step.timeout_s, text))
            if step.figures is not None:
                try:
                    rec["figures"] = step.figures(text, out, report["environment"])
                except Exception as e:  # noqa: BLE001 - a parser bug must not lose the report
                    rec["figures"] = {"error": f"{type(e).__name__}: {e}"}
        done[step.name] = rec
        report["steps"].append(rec)
        log(f"gpu-check: {step.name}: {rec['status']} ({rec['seconds']} s)"
            + (f": {rec['reason']}" if rec["reason"] else ""))
        finish(out, report, t_all)
    return finish(out, report, t_all)


def finish(out: Path, report: dict[str, Any], t0: float) -> dict[str, Any]:
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["summary"] = summarize(report["steps"])
    report["could_not_run"] = [{"step": r["name"], "status": r["status"], "reason": r["reason"]}
                               for r in report["steps"] if r["status"] != "ok"]
    with atomic_write(out / "gpu-check.json", "w") as f:
        json.dump(report, f, indent=1, default=str)
        f.write("\n")
    with atomic_write(out / "gpu-check.md", "w") as f:
        f.write(render_md(report))
    return report


def _fmt(v: Any) -> str:
    if isinstance(v, dict):
        return "; ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(map(str, v)) if v else "none"
    return str(v)


def render_md(report: dict[str, Any]) -> str:
    env, s = report["environment"], report["summary"]
    smi = env.get("nvidia_smi") or {}
    v = env.get("versions") or {}
    gpu = (f"{env['gpu']} ({env.get('gpu_memory_gib')} GiB, sm {env.get('capability')})" if env.get("gpu")
           else "none visible to torch")
    lines = [f"# GPU check: {s.get('ok', 0)} ok, {s.get('failed', 0)} failed, {s.get('timeout', 0)} timed out, "
             f"{s.get('skipped', 0)} skipped ({report['seconds']} s; limits {report['budget_s']} s of "
             f"{report['limit_s']})", "",
             f"- commit: {report['git_commit']}; started {report['started_utc']}; probe {report['probe']['status']}"
             + (f" ({report['probe']['reason']})" if report["probe"]["reason"] else ""),
             f"- GPU: {gpu}; " + (f"driver {smi['driver']} (supports CUDA {smi.get('driver_cuda')})"
                                  if smi.get("driver") else f"driver unknown ({smi.get('error')})"),
             f"- torch {env.get('torch')} (CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn')}); onnxruntime "
             f"{env.get('onnxruntime')} (onnxruntime-gpu {v.get('onnxruntime-gpu')}; providers "
             f"{_fmt(env.get('ort_providers') or [])}); TensorRT {env.get('tensorrt') or 'not importable'}; "
             f"CuPy {v.get('cupy-cuda13x')}; DeepSpeed {v.get('deepspeed')}; Python {env.get('python')}",
             f"- bf16 matmul peak {env.get('bf16_peak_tflops')} TFLOP/s; training model "
             f"{env.get('train_gflops_per_image')} GFLOP per image per forward", "",
             "| step | status | s | limit s | key figures / reason |", "|---|---|---|---|---|"]
    for r in report["steps"]:
        detail = _fmt(r["figures"]) if r["figures"] else ""
        if r["reason"]:
            detail = f"{detail}; {r['reason']}" if detail else r["reason"]
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']} | {r['timeout_s']} | "
                     f"{detail.replace('|', '/')} |")
    missing = [f"- {k}: {why}" for k, why in report["capabilities"].items() if why]
    lines += ["", "## Not available on this machine", "", *(missing or ["- nothing"]), ""]
    return "\n".join(lines)


def stop_on_sigterm() -> None:
    """SIGTERM (a job or device limit) exits through run_child's cleanup, which kills the running
    step's process group: the steps run in sessions of their own and would outlive the check."""
    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, stop)


def default_out() -> Path:
    return Path("runs") / time.strftime("gpu-check-%Y%m%d-%H%M%S")


def main(out: Path | None) -> int:
    """The CLI: a new or empty --out folder (a second check into the same folder would trip over
    the first one's training run), then the check; 2 with one error line for a bad --out."""
    out = out or default_out()
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise CxrError(f"--out {out}: not an empty folder (an earlier check?); give a new or empty one")
        out = ensure_writable_dir(out, "--out folder")
    except CxrError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stop_on_sigterm()
    report = run_check(out)
    print(Path(out, "gpu-check.md").read_text(), flush=True)
    s = report["summary"]
    return 1 if s["failed"] or s["timeout"] or report["probe"]["status"] != "ok" else 0
