#!/usr/bin/env bash
# The lent GPU machine: make the carried packages and the project importable (into /tmp only:
# nothing is installed system-wide), then run the GPU check into $OUT (the device tool's folder
# that comes back). Device tool command, from this checkout (carry: [".whl"]):
#
#   CXR_GIT_COMMIT=<sha of the tree> bash bench/gpu_check_device.sh
#
# .whl/*.whl: the wheels the machine lacks (../shared/notes/gpu-device.md lists them). onnxruntime-gpu
# is too big for one call: carry its parts over earlier calls, unpack them into /tmp/ortsite (same
# notes); when /tmp/ortsite exists it comes first on PYTHONPATH. The report is $OUT/gpu-check.md.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-runs/gpu-check}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 3
fi
# the project as the cxr_ddpm namespace, without pip: .typecheck/cxr_ddpm/{runtime,train,export}
# are the committed links to this tree that mypy reads too
export PYTHONPATH="/tmp/ortsite:$PWD/.typecheck:/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CXR_GIT_COMMIT="${CXR_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo 'unknown (set CXR_GIT_COMMIT)')}"
nvidia-smi -L || true
exec "$PY" -m bench gpu-check --out "$OUT"
