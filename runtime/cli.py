"""`cxr-runtime`: thin click commands over runtime/ library functions (never imports torch).

    cxr-runtime sample --engine model.onnx -n 16 --sampler dpmpp-2m --steps 20 --out samples/ --grid grid.png
    cxr-runtime inspect model.onnx
    cxr-runtime bench --engine model.onnx --batch-size 4 --steps 10 --ckpt run/checkpoints/step_00001000.safetensors
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import click

from .errors import CxrError, OneLineGroup, cli_errors
from .outputs import FORMATS
from .samplers import SAMPLERS

_engine = click.option("--engine", "engine", required=True, type=click.Path(path_type=Path),
                       help="ONNX model, TensorRT engine (cxr-export) or .safetensors checkpoint")
_provider = click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default=None,
                         help="execution provider [default: cpu; tensorrt for engine files]")
_backend = click.option("--backend", type=click.Choice(["onnx", "tensorrt", "torch"]), default=None,
                        help="override the backend chosen from the file")
_cuda_graph = click.option("--cuda-graph", type=click.Choice(["auto", "on", "off"]), default="auto",
                           show_default=True,
                           help="ONNX Runtime CUDA graphs, one per batch size (auto: on with --provider cuda)")
_arrays = click.option("--arrays", type=click.Choice(["auto", "numpy", "cupy"]), default="auto", show_default=True,
                       help="sampler math on NumPy or CuPy (auto: CuPy on a GPU provider when installed)")
_threads = click.option("--threads", type=int, default=None, help="CPU threads [default: CPU allowance]")


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Sample chest radiographs from exported ONNX / TensorRT engines."""


def _warn_line(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
               line: str | None = None) -> None:
    print(f"warning: {message}", file=sys.stderr)


@main.command()
@_engine
@click.option("-n", "n", type=int, default=16, show_default=True, help="number of images")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--sampler", type=click.Choice(list(SAMPLERS)), default="dpmpp-2m", show_default=True)
@click.option("--steps", type=int, default=None, help="model calls [default: ddpm T, ddim 50, dpmpp-2m 20]")
@click.option("--eta", type=float, default=None, help="DDIM noise scale in [0, 1] (0 = deterministic) [default: 0]")
@click.option("--seed", type=int, default=0, show_default=True, help="image i depends only on (seed, i)")
@click.option("--out", type=click.Path(path_type=Path), default=Path("samples"), show_default=True)
@click.option("--grid", type=click.Path(path_type=Path), default=None, help="also write a grid PNG here")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default="png", show_default=True)
@click.option("--class", "class_names", multiple=True, metavar="NAME",
              help="class to generate (repeatable; conditional models; images cycle through them)")
@click.option("--per-class", type=int, default=None, help="N images of each --class (or of every class)")
@click.option("--guidance", type=float, default=None,
              help="classifier-free guidance weight W: 1 conditional, 0 unconditional, >1 stronger [default: 1]")
@click.option("--no-clip", is_flag=True, help="do not clip x0 estimates to [-1, 1]")
@click.option("--shard", default=None, metavar="K/M", help="make only shard K of M of the indices (job arrays)")
@click.option("--request-time", default=None, metavar="ISO",
              help="the request's creation time (DICOM dates; fixed by slurm/sample.sh) [default: now, "
                   "or the time an unfinished set in --out was started with]")
@click.option("--check-only", is_flag=True, help="check the request and --out, print it, write nothing")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="model config of a lucidrains model-N.pt checkpoint (which carries none)")
@_provider
@_threads
@_backend
@_cuda_graph
@_arrays
@cli_errors
def sample(engine: Path, n: int, batch_size: int, sampler: str, steps: int | None, eta: float | None,
           seed: int, out: Path, grid: Path | None, fmt: str, class_names: tuple[str, ...],
           per_class: int | None, guidance: float | None, no_clip: bool, shard: str | None,
           request_time: str | None, check_only: bool, config_path: Path | None,
           provider: str | None, threads: int | None, backend: str | None,
           cuda_graph: str, arrays: str) -> None:
    """Write N sampled images, an optional grid, samples.json and manifest.csv.

    Resumable: rerun the same command and only missing images are made."""
    from tqdm import tqdm

    from .backends import load_denoiser, ort_cuda
    from .fsutil import ensure_writable_dir
    from .guidance import resolve_labels
    from .sample_set import parse_time, plan_set, quiet_warnings, sample_to_dir
    from .sampling import resolve_request
    from .shards import parse_shard, record_name, shard_range

    warnings.showwarning = _warn_line
    if n <= 0:                                     # checked before opening the engine: cheap, clear
        raise CxrError(f"-n {n}: the number of images must be >= 1")
    if batch_size <= 0:
        raise CxrError(f"--batch-size {batch_size}: must be >= 1")
    shard_km = parse_shard(shard) if shard is not None else None
    when = parse_time(request_time) if request_time is not None else None
    den = load_denoiser(engine, backend=backend, provider=provider, threads=threads,
                        cuda_graph=cuda_graph, **_checkpoint_config(engine, backend, config_path))
    xp = ort_cuda.sampler_arrays(arrays, den.provider, den.backend)
    labels, n = resolve_labels(den.meta, class_names, n, per_class, str(engine))
    req = resolve_request(den, n, sampler=sampler, steps=steps, eta=eta, seed=seed, labels=labels,
                          guidance=guidance, clip_x0=not no_clip)
    plan = plan_set(den, req, out=out, fmt=fmt, shard=shard_km, request_time=when, xp=xp)
    if check_only:
        click.echo(f"ok: {n} images, {len(shard_range(n, shard_km))} in this shard ({len(plan.todo)} still to "
                   f"make), {req.sampler} x{req.steps}, seed {req.seed}, request {plan.sha256[:12]} of "
                   f"{plan.when.isoformat()}, out {out}")
        return
    ensure_writable_dir(out)                       # fail before the progress bar starts
    if grid is not None:
        ensure_writable_dir(grid.parent, "grid folder")
    with quiet_warnings():
        with tqdm(total=len(plan.todo), unit="img", desc=f"{req.sampler} x{req.steps}", file=sys.stderr,
                  bar_format="{l_bar}{bar}| {n:.1f}/{total} [{elapsed}<{remaining}, {rate_fmt}]") as bar:
            rec = sample_to_dir(den, req, out=out, batch_size=batch_size, fmt=fmt, grid=grid, shard=shard_km,
                                request_time=when, on_step=lambda b: bar.update(b / req.steps), xp=xp,
                                plan=plan)
    kept = f", {len(plan.done)} kept from an earlier run" if plan.done else ""
    click.echo(f"wrote {len(plan.todo)} images to {out}/ ({rec['images_per_s']} images/s{kept})"
               + (f", grid {grid}" if grid else "") + f", record {out / record_name(shard_km)}")


def _checkpoint_config(engine: Path, backend: str | None, config_path: Path | None) -> dict[str, Any]:
    """--config is for checkpoints only (lucidrains model-N.pt carries no config)."""
    if config_path is None:
        return {}
    from .backends import detect_backend
    from .config import load_checkpoint_config
    if (backend or (detect_backend(engine) if engine.exists() else "onnx")) != "torch":
        raise CxrError(f"--config: {engine} carries its own config; --config is for checkpoints only")
    cfg, derive = load_checkpoint_config(config_path)
    return {"config": cfg, "derive_diffusion": derive}


@main.command()
@click.argument("engine", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print the raw metadata document")
@_backend
@cli_errors
def inspect(engine: Path, as_json: bool, backend: str | None) -> None:
    """Print an engine's metadata: model, schedule, I/O, provenance."""
    from .backends import detect_backend, load_denoiser
    if engine.is_file() and (backend or detect_backend(engine)) == "tensorrt":
        den = load_denoiser(engine, backend="tensorrt", open_engine=False)   # header only: no GPU
    else:
        den = load_denoiser(engine, backend=backend)
    m = den.meta
    if as_json:
        click.echo(json.dumps(m, indent=2, sort_keys=True))
        return
    cfg = den.config
    rows = [("file", str(engine)), ("kind", m.get("kind")), ("backend", den.backend),
            ("format_version", m.get("format_version")),
            ("image", f"{m['image_size']}x{m['image_size']}, {m['channels']} channel(s)"),
            ("model", f"dim {cfg.model.dim}, dim_mults {list(cfg.model.dim_mults)}, "
                      f"self_condition {cfg.model.self_condition}, classes {cfg.model.num_classes}"),
            ("objective", m["objective"]),
            ("schedule", f"{cfg.diffusion.beta_schedule}, T={cfg.diffusion.timesteps}, "
                         f"sha256 {den.schedule.digest()[:16]}"),
            ("class_names", ", ".join(m.get("class_names") or []) or "-")]
    for key in ("precision", "exporter", "opset", "batch", "source", "step", "tensorrt"):
        if key in m:
            rows.append((key, json.dumps(m[key]) if isinstance(m[key], (dict, list)) else m[key]))
    for io_kind in ("inputs", "outputs"):
        for spec in (m.get("io") or {}).get(io_kind, []):
            rows.append((io_kind[:-1], f"{spec['name']} {spec['dtype']} {spec['shape']}"))
    prov = m.get("provenance") or {}
    rows.append(("provenance", ", ".join(f"{k}={v}" for k, v in prov.items() if v is not None)))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


@main.command()
@_engine
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--steps", type=int, default=10, show_default=True, help="dpmpp-2m steps per timed run")
@click.option("--repeats", type=int, default=3, show_default=True, help="timed runs")
@click.option("--ckpt", type=click.Path(path_type=Path), default=None,
              help="also time the PyTorch reference from this checkpoint, side by side")
@click.option("--guidance", type=float, default=None,
              help="conditional models: also time guided sampling with weight W, side by side")
@_provider
@_threads
@_backend
@_cuda_graph
@_arrays
@cli_errors
def bench(engine: Path, batch_size: int, steps: int, repeats: int, ckpt: Path | None,
          guidance: float | None, provider: str | None, threads: int | None, backend: str | None,
          cuda_graph: str, arrays: str) -> None:
    """Per-step latency (median, p90), images/s, peak RSS and start-up time, each backend
    in a fresh process (so the ORT numbers never include torch)."""
    if batch_size <= 0 or steps <= 0 or repeats <= 0:
        raise CxrError("--batch-size, --steps and --repeats must be >= 1")
    if ckpt is not None and not ckpt.exists():
        raise CxrError(f"--ckpt {ckpt}: checkpoint not found")
    gpu = {"cuda_graph": cuda_graph, "arrays": arrays}
    runs = [bench_in_subprocess(engine, backend=backend, provider=provider, threads=threads,
                                batch_size=batch_size, steps=steps, repeats=repeats, **gpu)]
    if ckpt is not None:
        runs.append(bench_in_subprocess(ckpt, backend="torch", provider=provider if provider == "cuda" else None,
                                        threads=threads, batch_size=batch_size, steps=steps, repeats=repeats))
    if guidance is not None:
        runs.append(bench_in_subprocess(engine, backend=backend, provider=provider, threads=threads,
                                        batch_size=batch_size, steps=steps, repeats=repeats,
                                        guidance=guidance, **gpu))
    keys = [("step_ms_median", "step ms (median)"), ("step_ms_p90", "step ms (p90)"),
            ("images_per_s", f"images/s ({steps} steps)"), ("peak_rss_mib", "peak RSS MiB"),
            ("start_to_first_step_s", "start to first step s")]
    names = [f"{r['backend']}/{r['provider']}" + (f" W={r['guidance']:g}" if r.get("guidance") else "")
             for r in runs]
    head = ["", *names, *(f"{n} / first" for n in names[1:])]
    click.echo(f"batch {batch_size}, {steps} dpmpp-2m steps x {repeats} runs")
    click.echo("  ".join(f"{h:>24}" for h in head))
    for key, label in keys:
        vals = [r[key] for r in runs]
        cells = [label, *(f"{v:.3f}" for v in vals),
                 *((f"{v / vals[0]:.2f}x" if vals[0] else "-") for v in vals[1:])]
        click.echo("  ".join(f"{c:>24}" for c in cells))


def bench_in_subprocess(engine: Path, *, backend: str | None, provider: str | None, threads: int | None,
                        batch_size: int, steps: int, repeats: int,
                        guidance: float | None = None, cuda_graph: str | None = None,
                        arrays: str | None = None) -> dict[str, Any]:
    args = [sys.executable, "-m", "cxr_ddpm.runtime.cli", "bench-worker", str(engine),
            "--batch-size", str(batch_size), "--steps", str(steps), "--repeats", str(repeats)]
    for flag, value in (("--backend", backend), ("--provider", provider), ("--threads", threads),
                        ("--guidance", guidance), ("--cuda-graph", cuda_graph), ("--arrays", arrays)):
        if value is not None:
            args += [flag, str(value)]
    started = time.time()
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CxrError(f"{engine}: benchmark run failed ({last})")
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    rec["start_to_first_step_s"] = rec["first_step_at"] - started
    return rec


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@cli_errors
def manifest(out: Path) -> None:
    """Merge the shard records of a sample folder (slurm/sample.sh) into samples.json + manifest.csv."""
    from .shards import MANIFEST, merge
    rec = merge(out)
    click.echo(f"{out}: {len(rec['files'])} images" + (f" from {rec['shards']} shards" if rec.get("shards") else "")
               + f", request {rec['request_sha256'][:12]}; wrote {out / 'samples.json'} and {out / MANIFEST}")


@main.command("eval")
@click.argument("real_dir", type=click.Path(path_type=Path))
@click.argument("synth_dir", type=click.Path(path_type=Path))
@click.option("--features", type=click.Path(path_type=Path), default=None,
              help="Inception feature extractor from `cxr-export inception` (FID, KID, precision/recall)")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="report folder [default: SYNTH_DIR/eval]")
@click.option("--size", type=int, default=None, help="image size [default: the synthetic set's]")
@click.option("--fail-on-copies", is_flag=True, help="exit 3 when any synthetic image looks like a training copy")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@cli_errors
def eval_cmd(real_dir: Path, synth_dir: Path, features: Path | None, out: Path | None, size: int | None,
             fail_on_copies: bool, provider: str) -> None:
    """Compare a synthetic set with the real one: FID/KID/precision-recall (with --features),
    memorization audit, per-class counts, intensity histograms. Writes eval.json, eval.md, PNGs."""
    from .evaluate import evaluate, first_line
    if size is not None and size <= 0:
        raise CxrError(f"--size {size}: must be >= 1")
    report = evaluate(real_dir, synth_dir, out=out, features=features, size=size, provider=provider)
    m = report["memorization"]
    click.echo(first_line(report))
    click.echo(f"memorization: {len(m['copies'])} likely copies of training images "
               f"({100 * m['copy_share']:.1f}%); report {out or synth_dir / 'eval'}/eval.md")
    if fail_on_copies and m["copies"]:
        print(f"error: {len(m['copies'])} synthetic images look like copies of training images "
              f"(--fail-on-copies); see {out or synth_dir / 'eval'}/closest_pairs.png", file=sys.stderr)
        sys.exit(3)


@main.command("bench-worker", hidden=True)
@click.argument("engine", type=click.Path(path_type=Path))
@click.option("--batch-size", type=int, default=1)
@click.option("--steps", type=int, default=10)
@click.option("--repeats", type=int, default=3)
@click.option("--guidance", type=float, default=None)
@_provider
@_threads
@_backend
@_cuda_graph
@_arrays
@cli_errors
def bench_worker(engine: Path, batch_size: int, steps: int, repeats: int, guidance: float | None,
                 provider: str | None, threads: int | None, backend: str | None,
                 cuda_graph: str, arrays: str) -> None:
    """One backend's numbers as a JSON line (run by `bench` in a fresh process)."""
    from .backends import load_denoiser, ort_cuda
    from .sampling import bench_run
    den = load_denoiser(engine, backend=backend, provider=provider, threads=threads, cuda_graph=cuda_graph)
    xp = ort_cuda.sampler_arrays(arrays, den.provider, den.backend)
    rec = bench_run(den, batch_size=batch_size, steps=steps, repeats=repeats, guidance=guidance, xp=xp)
    rec["torch_imported"] = "torch" in sys.modules
    click.echo(json.dumps(rec))


if __name__ == "__main__":
    main()
