#!/bin/bash
# Train cxr-ddpm with DeepSpeed under Slurm: one task per GPU (or per CPU rank).
#
# Submit (any #SBATCH line below can be overridden on the sbatch command line):
#
#   CXR_DATA=/scratch/covid-cxr sbatch slurm/train.sh     # no CONFIG: configs/cxr128.yaml
#   sbatch slurm/train.sh configs/cxr128.yaml
#   sbatch --nodes=4 --ntasks-per-node=4 --gpus-per-node=4 --time=48:00:00 \
#          slurm/train.sh configs/cxr256.yaml --set train.steps=200000
#   sbatch --nodes=2 --cpus-per-task=2 slurm/train.sh configs/tiny.yaml --set train.zero_stage=2   # CPU cluster
#
# Or run this file directly (not through sbatch) and it submits itself, taking
# resources from the environment; GPUs are requested only when GPUS_PER_NODE is set:
#
#   NODES=2 GPUS_PER_NODE=4 TIME=12:00:00 PARTITION=gpu slurm/train.sh configs/cxr128.yaml
#
# Environment read inside the job (all optional):
#   CXR_VENV=/path/to/venv       activate this virtualenv on every node (bin/activate)
#   CXR_SETUP='module load cuda/12.4 gcc'   shell commands run before training (module hook)
#   CXR_DATA=/scratch/cxr        dataset folder (default: data.root of the config)
#   CXR_OUT=runs/NAME            run folder (default: runs/<job name>-<job id>); must be on a
#                                filesystem every node sees (checkpoints are written by all ranks)
#   MASTER_PORT=29500            rendezvous port (default: derived from the job id)
#
# Preemption and time limits:
#   --signal=USR1@120 makes Slurm send SIGUSR1 to every task 120 s before the time
#   limit. Each rank finishes its current step, they save a checkpoint together and
#   exit with code 75. This script then runs `scontrol requeue` (allowed by
#   --requeue): the job goes back to the queue under the same job id, and the next
#   start resumes from that checkpoint (--resume auto) in the same run folder.
#   When the cluster preempts the job (SIGTERM), Slurm requeues it by itself; the
#   ranks get SIGTERM and save the same way within the cluster's KillWait.
#   `scancel --signal=TERM JOBID` stops, saves and requeues the same way. Slurm signals
#   every process of the step; DataLoader workers ignore it (the ranks own the stop).
#
#SBATCH --job-name=cxr-ddpm
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -uo pipefail
EXIT_REQUEUE=75   # what `cxr-train fit` returns after saving on a signal

# No CONFIG (`sbatch slurm/train.sh`, or only options): train the default configs/cxr128.yaml
# of the checkout it was submitted from; the data then has to come from CXR_DATA.
default_config=""
if [[ $# -lt 1 || "$1" == -* ]]; then
    default_config="${SLURM_SUBMIT_DIR:-$PWD}/configs/cxr128.yaml"
    if [[ -z "${CXR_DATA:-}" ]]; then
        echo "error: no CONFIG given, so the default configs/cxr128.yaml would be trained: set CXR_DATA to its data (class folders), or pass CONFIG" >&2
        exit 2
    fi
    if [[ ! -f "$default_config" ]]; then
        echo "error: no CONFIG given and $default_config not found: submit from the repository root or pass CONFIG" >&2
        exit 2
    fi
fi

# --- not inside a job yet: submit ourselves with resources from the environment -------
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    args=(--nodes="${NODES:-1}" --cpus-per-task="${CPUS_PER_TASK:-8}" --time="${TIME:-24:00:00}")
    if [[ -n "${GPUS_PER_NODE:-}" ]]; then
        args+=(--gpus-per-node="$GPUS_PER_NODE" --ntasks-per-node="${TASKS_PER_NODE:-$GPUS_PER_NODE}")
    else
        args+=(--ntasks-per-node="${TASKS_PER_NODE:-1}")
    fi
    [[ -n "${PARTITION:-}" ]] && args+=(--partition="$PARTITION")
    [[ -n "${ACCOUNT:-}" ]] && args+=(--account="$ACCOUNT")
    exec sbatch "${args[@]}" "$0" "$@"
fi

# --- inside the job ------------------------------------------------------------------
if [[ -n "$default_config" ]]; then
    config="$default_config"
    echo "[$(date -Is)] no CONFIG given: training the default $config on CXR_DATA=$CXR_DATA"
else
    config="$1"; shift
fi

if [[ -n "${CXR_SETUP:-}" ]]; then eval "$CXR_SETUP" || exit 1; fi
if [[ -n "${CXR_VENV:-}" ]]; then
    # shellcheck disable=SC1091
    source "$CXR_VENV/bin/activate" || { echo "error: cannot activate CXR_VENV=$CXR_VENV" >&2; exit 1; }
fi
if command -v cxr-train >/dev/null; then train=(cxr-train); else train=(python -m cxr_ddpm.train.cli); fi

# Rendezvous: the first node of the allocation hosts it; the port comes from the job id
# so concurrent jobs on a shared node do not collide (train/dist.py derives the same).
export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}"
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
# One rank per task; on CPU each rank uses the cores Slurm gave its task.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

out="${CXR_OUT:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}"
fit_args=(fit --config "$config" --out "$out" --resume auto)
[[ -n "${CXR_DATA:-}" ]] && fit_args+=(--data "$CXR_DATA")

echo "[$(date -Is)] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_JOB_NUM_NODES} node(s)" \
     "[$SLURM_JOB_NODELIST] x ${SLURM_NTASKS_PER_NODE:-1} task(s), master $MASTER_ADDR:$MASTER_PORT, run $out"

# srun starts one task per rank; train/dist.py maps SLURM_PROCID/LOCALID/STEP_NUM_TASKS
# to RANK/LOCAL_RANK/WORLD_SIZE. Since Slurm 22.05 srun does not inherit
# --cpus-per-task from the allocation, so pass it on explicitly.
srun_args=(--kill-on-bad-exit=1)
[[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
srun "${srun_args[@]}" "${train[@]}" "${fit_args[@]}" "$@"
rc=$?

if [[ $rc -eq $EXIT_REQUEUE ]]; then
    echo "[$(date -Is)] stopped on a signal after saving; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
echo "[$(date -Is)] training exited with code $rc"
exit $rc
