#!/usr/bin/env bash
# sbatch script: multi-node (multi-GPU) `gfn-jax train` on a SLURM cluster, requeued on
# preemption (and near the time limit) until the run is finished.
#
# Usage (from the repository root, on a shared filesystem):
#   sbatch [sbatch options] launch/slurm.sh <gfn-jax train args, including --workdir>
#   launch/slurm.sh --dry-run <gfn-jax train args>     # print the commands, run nothing
#
# One process per node (default; each process drives all GPUs of its node):
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm.sh \
#       --config configs/rng.py --workdir runs/rng --config.mesh.fsdp=2 --config.mesh.tensor=8
# One process per GPU:
#   GFN_JAX_PER_GPU=1 sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 launch/slurm.sh ...
#
# Every task gets GFN_JAX_COORDINATOR (first node of the job, port GFN_JAX_PORT),
# GFN_JAX_NUM_PROCESSES (= SLURM_NTASKS) and GFN_JAX_PROCESS_ID (= SLURM_PROCID); with
# GFN_JAX_PER_GPU=1 also GFN_JAX_LOCAL_DEVICE_IDS (= SLURM_LOCALID). gfn_jax.parallel.
# initialize_distributed() reads them. Arguments are passed to `gfn-jax train` unchanged.
#
# Preemption: the job is requeueable (--requeue) and asks for SIGUSR1 300 s before its time
# limit (--signal=B:USR1@300). On SIGUSR1 or SIGTERM (what SLURM sends on preemption) the
# script forwards SIGTERM to the training step -- the trainer saves a checkpoint and exits --
# waits for it, and, unless the run is finished, calls `scontrol requeue $SLURM_JOB_ID`. The
# requeued job resumes from the workdir's latest checkpoint. When training ends by itself
# the script checks `python gfn_jax/sweep.py status WORKDIR` (a DONE file, or a final
# summary.json with steps == train.steps) and requeues an unfinished run the same way, also
# when the trainer exits 3 (gfn-jax's "preempted, checkpoint saved"); any other failing exit
# is not requeued. At most GFN_JAX_MAX_REQUEUES (default 20) requeues, counted by
# SLURM_RESTART_COUNT. A requeued job passes --force_unlock to gfn-jax train (its previous
# instance, which held the run-dir lock, is gone; GFN_JAX_FORCE_UNLOCK=0 turns this off).
#
# Optional environment:
#   GFN_JAX_SETUP        shell code run first in every task, e.g. "source .venv/bin/activate"
#                        or "module load cuda"
#   GFN_JAX_PIP_INSTALL  1: editable install of the repo plus GFN_JAX_JAX_EXTRA (default
#                        "jax[cuda12]") on the batch host, once, before training
#   GFN_JAX_PORT         coordinator port (default 12000 + SLURM_JOB_ID % 20000)
#   GFN_JAX_CMD          the command to run (default "gfn-jax train"; split on spaces,
#                        no quoting inside)
#   GFN_JAX_PYTHON       python for the status check (default python3)
#   GFN_JAX_MAX_REQUEUES requeue at most this many times (default 20)
#
#SBATCH --job-name=gfn-jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  awk 'NR > 1 && /^#/ && !/^#SBATCH/ { sub(/^# ?/, ""); print; next } NR > 1 && !/^#/ { exit }' "$0"
  exit 0
fi

run() {  # print, or run, a command
  if [[ "$DRY_RUN" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
log() { echo "[slurm.sh $(date +%H:%M:%S)] $*" >&2; }

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  if [[ "$DRY_RUN" == 0 ]]; then
    echo "error: run this script with sbatch (SLURM_JOB_ID is not set), or pass --dry-run" >&2
    exit 2
  fi
  # dry run outside SLURM: show the submission, then the job's commands with placeholders
  run sbatch "$0" "$@"
  SLURM_JOB_ID='$SLURM_JOB_ID'
  SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST'
  SLURM_NTASKS='$SLURM_NTASKS'
fi

cd "${SLURM_SUBMIT_DIR:-.}"

# The workdir (for the "finished?" check) from the pass-through arguments.
WORKDIR=""
prev=""
for a in "$@"; do
  if [[ "$prev" == "--workdir" ]]; then WORKDIR="$a"; fi
  case "$a" in --workdir=*) WORKDIR="${a#--workdir=}" ;; esac
  prev="$a"
done

if [[ -n "${GFN_JAX_SETUP:-}" ]]; then
  if [[ "$DRY_RUN" == 1 ]]; then echo "eval $(printf '%q' "$GFN_JAX_SETUP")"; else eval "$GFN_JAX_SETUP"; fi
fi
if [[ "${GFN_JAX_PIP_INSTALL:-0}" == 1 ]]; then
  run python -m pip install -q -e . "${GFN_JAX_JAX_EXTRA:-jax[cuda12]}"
fi

if [[ "$DRY_RUN" == 1 && "$SLURM_JOB_NODELIST" == '$SLURM_JOB_NODELIST' ]]; then
  run scontrol show hostnames "$SLURM_JOB_NODELIST"
  COORD_HOST='$FIRST_NODE'
  PORT="${GFN_JAX_PORT:-12000 + \$SLURM_JOB_ID % 20000}"
else
  # sed reads all of its input: `head -n 1` could close the pipe early and, with pipefail,
  # fail the script with SIGPIPE when scontrol prints many nodes
  COORD_HOST="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"
  PORT="${GFN_JAX_PORT:-$((12000 + SLURM_JOB_ID % 20000))}"
fi
export GFN_JAX_COORDINATOR="${COORD_HOST}:${PORT}"
export GFN_JAX_NUM_PROCESSES="${SLURM_NTASKS:-${SLURM_NNODES:-1}}"
export GFN_JAX_PER_GPU="${GFN_JAX_PER_GPU:-0}"
export GFN_JAX_CMD="${GFN_JAX_CMD:-gfn-jax train}"
PY="${GFN_JAX_PYTHON:-python3}"
MAX_REQUEUES="${GFN_JAX_MAX_REQUEUES:-20}"
RESTARTS="${SLURM_RESTART_COUNT:-0}"

log "job ${SLURM_JOB_ID} (restart ${RESTARTS}): ${GFN_JAX_NUM_PROCESSES} processes," \
    "coordinator ${GFN_JAX_COORDINATOR}, per-GPU=${GFN_JAX_PER_GPU}, nodes: ${SLURM_JOB_NODELIST}"

# Per-task variables must be expanded inside each task, hence the single quotes.
TASK_SCRIPT='
  set -euo pipefail
  if [[ -n "${GFN_JAX_SETUP:-}" ]]; then eval "$GFN_JAX_SETUP"; fi
  export GFN_JAX_PROCESS_ID="$SLURM_PROCID"
  if [[ "$GFN_JAX_PER_GPU" == 1 ]]; then export GFN_JAX_LOCAL_DEVICE_IDS="$SLURM_LOCALID"; fi
  exec $GFN_JAX_CMD "$@"
'
TRAIN_ARGS=("$@")
# a requeued job's previous instance is gone, and so is the holder of the run-dir lock
if (( RESTARTS > 0 )) && [[ "${GFN_JAX_FORCE_UNLOCK:-1}" == 1 ]]; then
  TRAIN_ARGS+=(--force_unlock)
fi
SRUN=(srun --kill-on-bad-exit=1 bash -c "$TASK_SCRIPT" gfn-jax "${TRAIN_ARGS[@]}")
STATUS=("$PY" gfn_jax/sweep.py status "$WORKDIR")
REQUEUE=(scontrol requeue "$SLURM_JOB_ID")

if [[ "$DRY_RUN" == 1 ]]; then
  run "${SRUN[@]}"
  echo "# after training, unless the run is finished ($(printf '%q ' "${STATUS[@]}")exits 0):"
  echo "# on SIGUSR1/SIGTERM the training step gets SIGTERM first (it saves a checkpoint)"
  run "${REQUEUE[@]}"
  exit 0
fi

finished() {
  if [[ -z "$WORKDIR" ]]; then return 1; fi
  "${STATUS[@]}" >/dev/null 2>&1
}

requeue_or_stop() {  # $1: why; requeue unless finished or out of requeues
  if finished; then
    log "run finished"
    return 0
  fi
  if (( RESTARTS >= MAX_REQUEUES )); then
    log "error: not finished after $RESTARTS requeues (GFN_JAX_MAX_REQUEUES=$MAX_REQUEUES); stopping"
    return 1
  fi
  log "$1: run not finished; requeueing job $SLURM_JOB_ID"
  "${REQUEUE[@]}" || log "warning: scontrol requeue failed"
  return 0
}

SIGNALLED=""
SRUN_PID=""
on_signal() {
  SIGNALLED="$1"
  log "got SIG$1: asking the training step to checkpoint and stop"
  if [[ -n "$SRUN_PID" ]]; then kill -TERM "$SRUN_PID" 2>/dev/null || true; fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# srun runs in the background so the traps fire while it runs; `wait` returns early (> 128)
# when a trapped signal arrives, so wait again until the step has really exited.
"${SRUN[@]}" &
SRUN_PID=$!
rc=0
while :; do
  rc=0
  wait "$SRUN_PID" || rc=$?
  if (( rc > 128 )) && kill -0 "$SRUN_PID" 2>/dev/null; then continue; fi
  break
done
SRUN_PID=""
trap - USR1 TERM

if [[ -n "$SIGNALLED" ]]; then
  requeue_or_stop "SIG$SIGNALLED (preemption or time limit)" || exit 1
  exit 0
fi
if [[ "$rc" == 3 ]]; then  # gfn-jax's "preempted: checkpoint saved" (it got SIGTERM)
  requeue_or_stop "training was preempted" || exit 1
  exit 0
fi
if [[ "$rc" != 0 ]]; then
  log "training failed (exit $rc); not requeued"
  exit "$rc"
fi
if [[ -z "$WORKDIR" ]]; then
  exit 0  # no --workdir to check: a clean exit is taken as finished
fi
requeue_or_stop "training stopped early" || exit 1
