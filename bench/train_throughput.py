"""Training throughput: plain data parallel (ZeRO stage 0) vs ZeRO-1/2/3, fp32 and bf16.

Every configuration trains the same model at the same global batch with the real
`cxr-train fit` under torchrun, on the bundled radiographs, and reports the
images/s and peak memory that fit itself measures (summary.json; the first step,
which pays for warm-up, is left out of the rate).

    python bench/train_throughput.py                        # 2 CPU ranks, tiny config
    python bench/train_throughput.py --ranks 1 --config configs/cxr128.yaml --steps 20   # one GPU

Prints a table and writes JSON to bench/results/train_<cpu|gpu>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(args: argparse.Namespace, stage: int, precision: str, out: Path) -> dict:
    micro = args.global_batch // args.ranks
    sets = [f"train.zero_stage={stage}", f"train.precision={precision}", f"train.steps={args.steps}",
            f"train.micro_batch={micro}", "train.sample_every=0", "train.save_every=0",
            f"train.log_every={args.steps}", "data.num_workers=0", "train.warmup_steps=1"]
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={args.ranks}",
           "-m", "cxr_ddpm.train.cli", "fit", "--config", args.config, "--data", args.data, "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        tail = p.stderr.strip().splitlines()[-3:]
        return {"zero_stage": stage, "precision": precision, "error": " | ".join(tail)}
    summary = json.loads((out / "summary.json").read_text())
    return {"zero_stage": stage, "precision": precision, "images_per_s": summary["images_per_s"],
            "peak_mem_mib": summary["peak_mem_mib"], "global_batch": summary["global_batch"],
            "wall_s": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--data", default=str(ROOT / "data" / "cxr-sample"))
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per rank (CPU)")
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/train_<device>.json)")
    args = ap.parse_args()

    import torch
    kind = "gpu" if torch.cuda.is_available() else "cpu"
    device = torch.cuda.get_device_name(0) if kind == "gpu" else f"{platform.processor() or 'cpu'} x{os.cpu_count()}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions.split(","):
            for stage in (int(s) for s in args.stages.split(",")):
                row = run_one(args, stage, precision, Path(tmp) / f"z{stage}-{precision}")
                rows.append(row)
                print(f"  done ZeRO-{stage} {precision}: {row.get('images_per_s', row.get('error'))}",
                      file=sys.stderr)
    base = {r["precision"]: r["images_per_s"] for r in rows if r["zero_stage"] == 0 and "images_per_s" in r}
    name = {0: "DDP (ZeRO-0)", 1: "ZeRO-1", 2: "ZeRO-2", 3: "ZeRO-3"}
    print(f"\ntraining throughput: {args.ranks} rank(s) on {kind} ({device}), {Path(args.config).name}, "
          f"global batch {args.global_batch}, {args.steps} steps (first excluded)")
    print(f"{'mode':<14}{'precision':<11}{'images/s':>10}{'vs DDP':>9}{'peak MiB/rank':>15}")
    for r in rows:
        if "error" in r:
            print(f"{name[r['zero_stage']]:<14}{r['precision']:<11}  failed: {r['error'][:80]}")
            continue
        rel = r["images_per_s"] / base[r["precision"]] if r["precision"] in base else float("nan")
        r["relative_to_ddp"] = round(rel, 3)
        print(f"{name[r['zero_stage']]:<14}{r['precision']:<11}{r['images_per_s']:>10.1f}{rel:>8.0%} "
              f"{r['peak_mem_mib']:>14.0f}")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"train_{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "train_throughput", "device": device, "kind": kind, "ranks": args.ranks,
        "threads_per_rank": args.threads, "config": Path(args.config).name, "global_batch": args.global_batch,
        "steps": args.steps, "torch": torch.__version__, "deepspeed": __import__("deepspeed").__version__,
        "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
