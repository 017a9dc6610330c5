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
import csv, hashlib, sys
from pathlib import Path
from safetensors.numpy import load_file
out = Path(sys.argv[1])
lines: list[str] = []
def same(a: bytes, b: bytes) -> str:
    return "same" if hashlib.sha256(a).digest() == hashlib.sha256(b).digest() else "DIFFERENT"
for run in ("single", "resume", "ranks2"):
    a, b = out / "old" / run, out / "new" / run
    cols = [[r[:4] for r in csv.reader((d / "log.csv").open())] for d in (a, b)]
    verdict = "same" if cols[0] == cols[1] else "DIFFERENT"
    lines.append(f"{run:7s} log.csv step,loss,lr,grad_norm ({len(cols[1]) - 1} rows): {verdict}")
    for f in sorted(a.glob("samples/*.png")):
        lines.append(f"{run:7s} {f.relative_to(a)}: {same(f.read_bytes(), (b / f.relative_to(a)).read_bytes())}")
    for f in sorted(a.glob("checkpoints/*.safetensors")):
        ta, tb = load_file(f), load_file(b / f.relative_to(a))
        ok = ta.keys() == tb.keys() and all(same(ta[k].tobytes(), tb[k].tobytes()) == "same" for k in ta)
        lines.append(f"{run:7s} {f.relative_to(a)}: {len(ta)} tensors {'same' if ok else 'DIFFERENT'}")
print("\n".join(lines))
sys.exit(any("DIFFERENT" in line for line in lines))   # exit 1: not bit-identical
PY
