#!/usr/bin/env bash
# sbatch script: multi-node (multi-GPU) `gfn-jax train` on a SLURM cluster.
#
# Usage (from the repository root, on a shared filesystem):
#   sbatch [sbatch options] launch/slurm.sh <gfn-jax train args>
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
# Optional environment:
#   GFN_JAX_SETUP        shell code run first in every task, e.g. "source .venv/bin/activate"
#                        or "module load cuda"
#   GFN_JAX_PIP_INSTALL  1: editable install of the repo plus GFN_JAX_JAX_EXTRA (default
#                        "jax[cuda12]") on the batch host, once, before training
#   GFN_JAX_PORT         coordinator port (default 12000 + SLURM_JOB_ID % 20000)
#   GFN_JAX_CMD          the command to run (default "gfn-jax train"; split on spaces,
#                        no quoting inside)
#
#SBATCH --job-name=gfn-jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "error: run this script with sbatch (SLURM_JOB_ID is not set)" >&2
  exit 2
fi

cd "${SLURM_SUBMIT_DIR:-.}"

if [[ -n "${GFN_JAX_SETUP:-}" ]]; then
  eval "$GFN_JAX_SETUP"
fi
if [[ "${GFN_JAX_PIP_INSTALL:-0}" == 1 ]]; then
  python -m pip install -q -e . "${GFN_JAX_JAX_EXTRA:-jax[cuda12]}"
fi

COORD_HOST="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export GFN_JAX_COORDINATOR="${COORD_HOST}:${GFN_JAX_PORT:-$((12000 + SLURM_JOB_ID % 20000))}"
export GFN_JAX_NUM_PROCESSES="${SLURM_NTASKS:-${SLURM_NNODES:-1}}"
export GFN_JAX_PER_GPU="${GFN_JAX_PER_GPU:-0}"
export GFN_JAX_CMD="${GFN_JAX_CMD:-gfn-jax train}"

echo "gfn-jax: ${GFN_JAX_NUM_PROCESSES} processes, coordinator ${GFN_JAX_COORDINATOR}," \
     "per-GPU=${GFN_JAX_PER_GPU}, nodes: ${SLURM_JOB_NODELIST}"

# Per-task variables must be expanded inside each task, hence the single quotes.
srun --kill-on-bad-exit=1 bash -c '
  set -euo pipefail
  if [[ -n "${GFN_JAX_SETUP:-}" ]]; then eval "$GFN_JAX_SETUP"; fi
  export GFN_JAX_PROCESS_ID="$SLURM_PROCID"
  if [[ "$GFN_JAX_PER_GPU" == 1 ]]; then export GFN_JAX_LOCAL_DEVICE_IDS="$SLURM_LOCALID"; fi
  exec $GFN_JAX_CMD "$@"
' gfn-jax "$@"
