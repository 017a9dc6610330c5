"""`cxr-runtime`: thin click commands over runtime/ library functions (never imports torch).

    cxr-runtime sample --engine model.onnx -n 16 --sampler dpmpp-2m --steps 20 --out samples/ --grid grid.png
    cxr-runtime inspect model.onnx
    cxr-runtime bench --engine model.onnx --batch-size 4 --steps 10 --ckpt run/checkpoints/step_00001000.safetensors
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from .errors import CxrError, OneLineGroup, cli_errors
from .outputs.formats import FORMATS
from .sampling.samplers import SAMPLERS

_engine = click.option("--engine", "engine", required=True, type=click.Path(path_type=Path),
                       help="ONNX model, TensorRT engine (cxr-export) or .safetensors checkpoint")
_provider = click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default=None,
                         help="execution provider [default: cpu; tensorrt for engine files]")
_backend = click.option("--backend", type=click.Choice(["onnx", "tensorrt", "torch"]), default=None,
                        help="override the backend chosen from the file")
_cuda_graph = click.option("--cuda-graph", type=click.Choice(["auto", "on", "off"]), default="auto",
                           show_default=True,
                           help="CUDA graphs, one per batch size (auto: on with --provider cuda and for "
                                "TensorRT engines)")
_arrays = click.option("--arrays", type=click.Choice(["auto", "numpy", "cupy"]), default="auto", show_default=True,
                       help="sampler math on NumPy or CuPy (auto: CuPy on a GPU provider when installed)")
_threads = click.option("--threads", type=click.IntRange(min=1), default=None,
                        help="CPU threads [default: CPU allowance]")
_tf32 = click.option("--tf32/--no-tf32", default=False, show_default=True,
                     help="ONNX Runtime CUDA: fp32 MatMul/Conv in TF32 (faster, less exact; README: Sampling)")


def _backend_flags(fn: Any) -> Any:
    """--provider, --threads, --backend, --cuda-graph, --arrays: how a sampling command runs its model."""
    for option in reversed((_provider, _threads, _backend, _cuda_graph, _arrays)):
        fn = option(fn)
    return fn


_trt_cache = click.option("--trt-cache", type=click.Path(path_type=Path), default=None, metavar="DIR",
                          help="--provider tensorrt engine cache [default: MODEL.onnx.trtcache/]")


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Sample chest radiographs from exported ONNX / TensorRT engines."""


def _warn_line(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
               line: str | None = None) -> None:
    print(f"warning: {message}", file=sys.stderr)


@main.command()
@_engine
@click.option("-n", "n", type=int, default=16, show_default=True, help="number of images")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
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
@_backend_flags
@_tf32
@_trt_cache
@cli_errors
def sample(engine: Path, n: int, batch_size: int, sampler: str, steps: int | None, eta: float | None,
           seed: int, out: Path, grid: Path | None, fmt: str, class_names: tuple[str, ...],
           per_class: int | None, guidance: float | None, no_clip: bool, shard: str | None,
           request_time: str | None, check_only: bool, config_path: Path | None,
           provider: str | None, threads: int | None, backend: str | None,
           cuda_graph: str, arrays: str, tf32: bool, trt_cache: Path | None) -> None:
    """Write N sampled images, an optional grid, samples.json and manifest.csv.

    Resumable: rerun the same command and only missing images are made."""
    from tqdm import tqdm

    from .backends import load_denoiser, ort_cuda
    from .sampling.guidance import resolve_labels
    from .outputs.sample_set import SetWriter, check_outputs, parse_time, plan_set, quiet_warnings
    from .sampling.generate import resolve_request
    from .outputs.shards import parse_shard, shard_range, writer_lock

    # CLI -> artifact -> request -> plan -> writer -> batches -> sampler -> backend, each checked once
    warnings.showwarning = _warn_line
    shard_km = parse_shard(shard) if shard is not None else None
    check_outputs(out, shard_km, grid)                   # before the engine opens and the lock makes --out
    when = parse_time(request_time) if request_time is not None else None
    calls = batch_size * (2 if guidance not in (None, 0.0, 1.0) else 1)   # guided: cond + uncond, one call
    den = load_denoiser(engine, backend=backend, provider=provider, threads=threads,
                        cuda_graph=cuda_graph, tf32=tf32, trt_cache_dir=trt_cache, trt_batches=(1, calls),
                        **_checkpoint_config(engine, backend, config_path))
    xp = ort_cuda.sampler_arrays(arrays, den.provider, den.backend)
    labels, n = resolve_labels(den.artifact, class_names, n, per_class, str(engine))
    req = resolve_request(den, n, sampler=sampler, steps=steps, eta=eta, seed=seed, labels=labels,
                          guidance=guidance, clip_x0=not no_clip)
    planned = {"out": out, "batch_size": batch_size, "fmt": fmt, "shard": shard_km, "request_time": when,
               "xp": xp, "grid": grid}
    if check_only:                                       # planned without the lock: nothing is written
        plan = plan_set(den, req, **planned)
        click.echo(f"ok: {n} images, {len(shard_range(n, shard_km))} in this shard ({len(plan.todo)} still to "
                   f"make), {req.sampler} x{req.steps}, seed {req.seed}, request {plan.sha256[:12]} of "
                   f"{plan.when.isoformat()}, out {out}")
        return
    with writer_lock(out, shard_km), quiet_warnings():   # one writer per record: a second is refused here
        plan = plan_set(den, req, **planned)
        writer = SetWriter(den, plan)                    # its folders: fail before the progress bar starts
        with tqdm(total=len(plan.todo), unit="img", desc=f"{req.sampler} x{req.steps}", file=sys.stderr,
                  bar_format="{l_bar}{bar}| {n:.1f}/{total} [{elapsed}<{remaining}, {rate_fmt}]") as bar:
            rec = writer.write(on_step=lambda b: bar.update(b / req.steps))
    kept = f", {len(plan.done)} kept from an earlier run" if plan.done else ""
    if grid is not None and rec["grid"] is None:
        print(f"warning: --grid {grid}: not written, no image was made in this run (it draws those)",
              file=sys.stderr)
    click.echo(f"wrote {len(plan.todo)} images to {out}/ ({rec['images_per_s']} images/s{kept})"
               + (f", grid {rec['grid']}" if rec["grid"] else "") + f", record {plan.record_path}")


def _checkpoint_config(engine: Path, backend: str | None, config_path: Path | None) -> dict[str, Any]:
    """--config is for checkpoints only (lucidrains model-N.pt carries no config)."""
    if config_path is None:
        return {}
    from .backends import detect_backend
    if (backend or (detect_backend(engine) if engine.exists() else "onnx")) != "torch":
        raise CxrError(f"--config: {engine} carries its own config; --config is for checkpoints only")
    return {"config_file": config_path}          # read by the torch side (the training schema is its own)


@main.command()
@click.argument("engine", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print the raw metadata document")
@_backend
@cli_errors
def inspect(engine: Path, as_json: bool, backend: str | None) -> None:
    """Print an artifact's metadata: contract version, model, schedule, I/O, provenance (with the
    training and data settings it was made with, as recorded: shown, never validated)."""
    from .contract.artifact import open_artifact
    from .backends import detect_backend, load_denoiser
    from .contract.describe import describe
    chosen = backend or (detect_backend(engine) if engine.exists() else "onnx")
    if chosen == "torch" and (engine.is_dir() or engine.suffix != ".safetensors"):
        art = load_denoiser(engine, backend="torch").artifact    # run folders, lucidrains files: torch side
    else:                                                       # the document alone: no session, no GPU
        art = open_artifact(engine, {"torch": "checkpoint"}.get(chosen, chosen))
    click.echo(json.dumps(art.meta, indent=2, sort_keys=True) if as_json
               else describe(art, file=engine, backend=chosen))


@main.command()
@_engine
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--steps", type=int, default=10, show_default=True, help="dpmpp-2m steps per timed run")
@click.option("--repeats", type=int, default=3, show_default=True, help="timed runs")
@click.option("--ckpt", type=click.Path(path_type=Path), default=None,
              help="also time the PyTorch reference from this checkpoint, side by side")
@click.option("--guidance", type=float, default=None,
              help="conditional models: also time guided sampling with weight W, side by side")
@_backend_flags
@cli_errors
def bench(engine: Path, batch_size: int, steps: int, repeats: int, ckpt: Path | None,
          guidance: float | None, provider: str | None, threads: int | None, backend: str | None,
          cuda_graph: str, arrays: str) -> None:
    """Per-step latency (median, p90), images/s, peak RSS and start-up time, each backend
    in a fresh process (so the ORT numbers never include torch)."""
    from .sampling.bench import compare, table
    runs = compare(engine, ckpt=ckpt, guidance=guidance, backend=backend, provider=provider, threads=threads,
                   batch_size=batch_size, steps=steps, repeats=repeats, cuda_graph=cuda_graph, arrays=arrays)
    click.echo(table(runs, batch_size=batch_size, steps=steps, repeats=repeats))


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@cli_errors
def manifest(out: Path) -> None:
    """Merge the shard records of a sample folder (slurm/sample.sh) into samples.json + manifest.csv."""
    from .outputs.shards import MANIFEST, merge
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
@click.option("--heldout", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="real images of patients not trained on (class folders or one folder): the data-copying test")
@click.option("--fail-on-copies", is_flag=True,
              help="exit 3 when the audit flags a synthetic image as a training copy, or when the data-copying "
                   "test finds copying (Z < -3 with >= 64 synthetic and >= 20 held-out images)")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@cli_errors
def eval_cmd(real_dir: Path, synth_dir: Path, features: Path | None, out: Path | None, size: int | None,
             heldout: Path | None, fail_on_copies: bool, provider: str) -> None:
    """Compare a synthetic set with the real one (REAL_DIR: the training images): FID/KID/precision-
    recall (with --features), memorization audit, data-copying test (with --heldout), per-class
    counts, intensity histograms. Writes eval.json, eval.md, PNGs."""
    from .evaluation.evaluate import evaluate, first_line
    if size is not None and size <= 0:
        raise CxrError(f"--size {size}: must be >= 1")
    report = evaluate(real_dir, synth_dir, out=out, features=features, size=size, provider=provider,
                      heldout=heldout)
    m, c = report["memorization"], report["data_copying"]
    where = out or synth_dir / "eval"
    click.echo(first_line(report))
    click.echo(f"memorization: {len(m['copies'])} likely copies of training images "
               f"({100 * m['copy_share']:.1f}%); report {where}/eval.md")
    click.echo(f"data copying: {c['sentence']}")
    if fail_on_copies and m["copies"]:
        print(f"error: {len(m['copies'])} synthetic images look like copies of training images "
              f"(--fail-on-copies); see {where}/closest_pairs.png", file=sys.stderr)
        sys.exit(3)
    if fail_on_copies and c["verdict"] == "copying":
        print(f"error: the synthetic set copies its training patients (data-copying test Z = {c['z']:+.2f} "
              f"< -3; --fail-on-copies); see {where}/distances.png", file=sys.stderr)
        sys.exit(3)


@main.command("bench-worker", hidden=True)
@click.argument("engine", type=click.Path(path_type=Path))
@click.option("--batch-size", type=int, default=1)
@click.option("--steps", type=int, default=10)
@click.option("--repeats", type=int, default=3)
@click.option("--guidance", type=float, default=None)
@_backend_flags
@cli_errors
def bench_worker(engine: Path, batch_size: int, steps: int, repeats: int, guidance: float | None,
                 provider: str | None, threads: int | None, backend: str | None,
                 cuda_graph: str, arrays: str) -> None:
    """One backend's numbers as a JSON line (run by `bench` in a fresh process)."""
    from .backends import load_denoiser, ort_cuda
    from .sampling.bench import bench_run
    den = load_denoiser(engine, backend=backend, provider=provider, threads=threads, cuda_graph=cuda_graph)
    xp = ort_cuda.sampler_arrays(arrays, den.provider, den.backend)
    rec = bench_run(den, batch_size=batch_size, steps=steps, repeats=repeats, guidance=guidance, xp=xp)
    rec["torch_imported"] = "torch" in sys.modules
    click.echo(json.dumps(rec))


if __name__ == "__main__":
    main()
