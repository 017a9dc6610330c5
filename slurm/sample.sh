#!/bin/bash
# Generate a synthetic radiograph set with a Slurm job array: task k samples a disjoint range
# of image indices (image i depends only on the seed and i, so shards are exact), then one
# merge job that depends on the array writes the set's samples.json and manifest.csv.
#
#   sbatch slurm/sample.sh ENGINE --count N [--per-class N] [cxr-runtime sample options]
#   sbatch slurm/sample.sh cxr128.onnx --count 20000 --out /scratch/synth --sampler dpmpp-2m --steps 20
#   CXR_TASKS=16 CXR_SBATCH_ARGS='--partition=gpu --gpus-per-task=1' \
#       sbatch slurm/sample.sh cxr128.fp16.engine --per-class 5000 --out synth/ --provider tensorrt
#
# The first job (this script, submitted by you) only plans: it checks the request, fixes its
# creation time (so every task writes identical DICOM dates and UIDs), submits the array of
# CXR_TASKS tasks (default 4; this file's #SBATCH lines plus CXR_SBATCH_ARGS, e.g.
# '--partition=gpu --gpus-per-task=1') and the merge job with --dependency=afterany:ARRAY,
# then exits. Each array task runs
#   cxr-runtime sample ... --shard K/CXR_TASKS --request-time T
# and is resumable: a rerun or a requeued task skips images already written with the same
# settings and metadata hash; a half-written file never counts (files are written atomically).
# If a task failed, rerun the same sbatch line: finished images are kept, the missing ones are
# made, and the merge runs again. `cxr-runtime manifest OUT` merges by hand.
#
# Environment (all optional): CXR_TASKS (array size), CXR_SBATCH_ARGS (array task resources),
# CXR_VENV (virtualenv to activate),
# CXR_SETUP ('module load ...' commands), CXR_REQUEST_TIME (fix the creation time yourself).
# The engine file and the output folder must be on a filesystem every node sees.
#
#SBATCH --job-name=cxr-sample
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out

set -uo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: sbatch slurm/sample.sh ENGINE --count N [--per-class N] [cxr-runtime sample options]" >&2
    exit 2
fi
engine="$1"; shift

if [[ -n "${CXR_SETUP:-}" ]]; then eval "$CXR_SETUP" || exit 1; fi
if [[ -n "${CXR_VENV:-}" ]]; then
    # shellcheck disable=SC1091
    source "$CXR_VENV/bin/activate" || { echo "error: cannot activate CXR_VENV=$CXR_VENV" >&2; exit 1; }
fi
if command -v cxr-runtime >/dev/null; then rt=(cxr-runtime); else rt=(python -m cxr_ddpm.runtime.cli); fi

# --count N is this script's name for cxr-runtime's -n; find --out for the merge job
args=(); out=samples
while [[ $# -gt 0 ]]; do
    case "$1" in
        --count) args+=(-n "$2"); shift 2 ;;
        --count=*) args+=(-n "${1#*=}"); shift ;;
        --out) out="$2"; args+=(--out "$2"); shift 2 ;;
        --out=*) out="${1#*=}"; args+=("$1"); shift ;;
        --shard|--shard=*|--request-time|--request-time=*)
            echo "error: $1 is set by slurm/sample.sh itself" >&2; exit 2 ;;
        *) args+=("$1"); shift ;;
    esac
done

if [[ -z "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    # --- the planning job (or a direct run): check the request, submit the array and the merge
    tasks="${CXR_TASKS:-4}"
    if ! [[ "$tasks" =~ ^[1-9][0-9]*$ ]]; then
        echo "error: CXR_TASKS=$tasks must be a positive integer" >&2; exit 2
    fi
    when="${CXR_REQUEST_TIME:-$(date -u +%Y-%m-%dT%H:%M:%SZ)}"
    # refuse a bad request here, in one line, before any task is queued
    "${rt[@]}" sample --engine "$engine" "${args[@]}" --shard "0/$tasks" --request-time "$when" --check-only || exit 2
    here="${SLURM_SUBMIT_DIR:-$PWD}"
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then    # inside the planning job this file is Slurm's spool copy
        script=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
    else
        script="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
    fi
    [[ -f "$script" ]] || { echo "error: cannot find slurm/sample.sh to submit the array (got '$script')" >&2; exit 1; }
    export CXR_REQUEST_TIME="$when"
    # shellcheck disable=SC2086  # CXR_SBATCH_ARGS holds several flags
    array=$(sbatch --parsable --array="0-$((tasks - 1))" --chdir="$here" ${CXR_SBATCH_ARGS:-} \
            "$script" "$engine" "${args[@]}" 2>&1) || { echo "error: sbatch of the array failed: $array" >&2; exit 1; }
    array="${array%%;*}"
    merge=$(sbatch --parsable --dependency="afterany:$array" --job-name=cxr-manifest --chdir="$here" \
            --ntasks=1 --cpus-per-task=1 --time=00:30:00 --output="%x-%j.out" \
            --wrap="$(printf '%q ' "${rt[@]}" manifest "$out")" 2>&1) \
        || { echo "error: sbatch of the merge job failed: $merge" >&2; exit 1; }
    echo "[$(date -Is)] request $when: array job $array ($tasks tasks) -> $out, merge job ${merge%%;*}"
    exit 0
fi

# --- one array task: its shard of the indices
task="$SLURM_ARRAY_TASK_ID"; tasks="${SLURM_ARRAY_TASK_COUNT:?}"
echo "[$(date -Is)] task $task/$tasks of array ${SLURM_ARRAY_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname)"
"${rt[@]}" sample --engine "$engine" "${args[@]}" --shard "$task/$tasks" --request-time "${CXR_REQUEST_TIME:?}"
rc=$?
echo "[$(date -Is)] task $task exited with code $rc"
exit $rc
