#!/usr/bin/env bash
# Is training still bit-identical to an older commit? For refactors that must not change results.
#   bash docs/same_training.sh REV [OUT]      (from the repository root, after `make install`)
# Trains the tiny config on the bundled images for 24 steps (log every step, a grid and a save every 12)
# three ways in each tree: one rank, 12 steps then a resume to 24, and torchrun with 2 ranks; both trees
# run with this checkout's .venv or $PY (PYTHONPATH selects the tree's code). Prints,
# per run, whether log.csv's step, loss, lr and grad_norm columns, the sample grids and every checkpoint
# tensor are the same; exits 1 if anything differs. REV must run under today's dependencies.
set -euo pipefail
REV=${1:?usage: bash docs/same_training.sh REV [OUT]}
ROOT=$PWD; PY=${PY:-$ROOT/.venv/bin/python}; OUT=$(realpath -m "${2:-runs/same-training}")
OLD=$(mktemp -d); PKGS=$(mktemp -d)   # PKGS/TAG/cxr_ddpm/X -> TREE/X: pyproject.toml's package mapping
trap 'git -C "$ROOT" worktree remove --force "$OLD"; rm -rf "$PKGS"' EXIT
git worktree add -q --detach "$OLD" "$REV"
for tag in old new; do
  mkdir -p "$PKGS/$tag/cxr_ddpm"
  tree=$([ $tag = old ] && echo "$OLD" || echo "$ROOT")
  for x in runtime train export; do ln -s "$tree/$x" "$PKGS/$tag/cxr_ddpm/$x"; done
done
rm -rf "$OUT"; mkdir -p "$OUT"
SETS=(--set train.steps=24 --set train.save_every=12 --set train.sample_every=12 --set train.warmup_steps=4
      --set train.log_every=1 --set data.num_workers=0)
run() {  # ERRLOG ARGS...: python ARGS, its stderr appended to ERRLOG
  local err=$1; shift
  "$PY" "$@" >/dev/null 2>>"$err" ||
    { echo "error: python $* failed; the end of $err:" >&2; tail -5 "$err" >&2; exit 1; }
}
train() {  # TREE TAG: the three runs
  cd "$1" && export PYTHONPATH=$PKGS/$2 OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""
  "$PY" -c "import cxr_ddpm.train, sys; sys.exit(not cxr_ddpm.train.__path__[0].startswith('$PKGS/'))" ||
    { echo "error: PYTHONPATH does not select $1's code" >&2; exit 2; }
  local fit=(fit --config configs/tiny.yaml --data data/cxr-sample "${SETS[@]}") o=$OUT/$2
  run "$o.err" -m cxr_ddpm.train.cli "${fit[@]}" --out "$o/single"
  run "$o.err" -m cxr_ddpm.train.cli "${fit[@]}" --out "$o/resume" --set train.steps=12
  run "$o.err" -m cxr_ddpm.train.cli "${fit[@]}" --out "$o/resume" --resume auto
  run "$o.err" -m torch.distributed.run --standalone --nproc_per_node 2 -m cxr_ddpm.train.cli "${fit[@]}" \
      --out "$o/ranks2"
}
echo "training $REV in $OLD, then this checkout" >&2
(train "$OLD" old); (train "$ROOT" new)
"$PY" - "$OUT" <<'PY'
import csv, sys
from pathlib import Path
from safetensors.numpy import load_file
out = Path(sys.argv[1])
rows: list[tuple[str, bool]] = []
for run in ("single", "resume", "ranks2"):
    a, b = out / "old" / run, out / "new" / run
    logs = [[r[:4] for r in csv.reader((d / "log.csv").open())] for d in (a, b)]
    rows.append((f"{run:7s} log.csv step,loss,lr,grad_norm ({len(logs[1]) - 1} rows)", logs[0] == logs[1]))
    for pattern in ("samples/*.png", "checkpoints/*.safetensors"):
        names = [sorted(f.relative_to(d) for f in d.glob(pattern)) for d in (a, b)]
        if names[0] != names[1]:
            rows.append((f"{run:7s} {pattern}: {len(names[0])} files vs {len(names[1])}", False))
            continue
        for f in names[0]:
            if f.suffix == ".png":
                rows.append((f"{run:7s} {f}", (a / f).read_bytes() == (b / f).read_bytes()))
            else:
                ta, tb = load_file(a / f), load_file(b / f)
                rows.append((f"{run:7s} {f}: {len(ta)} tensors", ta.keys() == tb.keys() and all(
                    ta[k].shape == tb[k].shape and ta[k].tobytes() == tb[k].tobytes() for k in ta)))
print("\n".join(f"{what}: {'same' if ok else 'DIFFERENT'}" for what, ok in rows))
sys.exit(not all(ok for _, ok in rows))   # exit 1: not bit-identical
PY
