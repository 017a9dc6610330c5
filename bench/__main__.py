"""`python -m bench all --out bench/results`, or one section: denoiser | sampling | accuracy | train | guidance | gpu | loader.

`--quick` shrinks every section to tiny sizes and 2 runs (what tests/test_bench.py uses);
`report` only rebuilds README-performance.md from existing JSONs;
`gpu-check --out DIR` runs everything a GPU machine must verify (bench/gpu_check.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.fsutil import ensure_writable_dir

SECTIONS = ("denoiser", "sampling", "accuracy", "train", "guidance", "gpu", "loader")


def run_section(name: str, out: Path, quick: bool, check: bool = False) -> Path:
    from . import accuracy, denoiser, gpu, guidance, loader, sampling, train
    if name == "denoiser":
        return (denoiser.run(out, models=("tiny",), sizes=(32,), batches=(1, 2), runs=2, compile_at=None,
                             extras=False) if quick else denoiser.run(out))
    if name == "sampling":
        return (sampling.run(out, models=(("tiny", 32, False),), batch=2, measure_steps=2) if quick
                else sampling.run(out))
    if name == "accuracy":
        return (accuracy.run(out, n=2, steps=(5,), clips=(True,), train_steps=20) if quick
                else accuracy.run(out))
    if name == "train":
        return (train.run(out, ranks=1, steps=2, stages=(0,), precisions=("fp32",), global_batch=4,
                          overhead_variants=()) if quick else train.run(out))
    if name == "guidance":
        return (guidance.run(out, models=(("tiny", 32),), batches=(2,), runs=2) if quick
                else guidance.run(out))
    if name == "loader":
        return (loader.run(out, sizes=(32,), workers=(0,), seconds=0.1, rounds=1, megapixels=(0.3,)) if quick
                else loader.run(out))
    if check:                    # gpu-check's share of a short GPU session: cxr128 only, one repeat
        return gpu.run(out, models=(("cxr128", 128),), batches=(16,), runs=10, step_batch=16, e2e_batch=16,
                       e2e_repeats=1)
    return (gpu.run(out, models=(("tiny", 32),), batches=(1,), runs=2, sampling=("tiny", 32), step_batch=1,
                    e2e_batch=2, e2e_steps=2, e2e_repeats=1) if quick else gpu.run(out))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("section", choices=("all", *SECTIONS, "report", "gpu-check"))
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default bench/results; gpu-check: a new runs/gpu-check-<time>)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 runs: a smoke test, not numbers")
    ap.add_argument("--check", action="store_true", help="gpu: the short run of gpu-check (cxr128, batch 16)")
    args = ap.parse_args(argv)
    if args.section == "gpu-check":
        from .gpu_check import main as gpu_check
        return gpu_check(args.out)
    args.out = args.out or Path("bench/results")
    try:
        out = ensure_writable_dir(args.out, "--out folder")
    except CxrError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .report import write_readme_snippet
    os.environ.setdefault("TQDM_MININTERVAL", "5")
    names = SECTIONS if args.section == "all" else () if args.section == "report" else (args.section,)
    t_all = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        path = run_section(name, out, args.quick, args.check)
        print(f"== {name}: wrote {path} in {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"wrote {write_readme_snippet(out)} (total {time.perf_counter() - t_all:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
