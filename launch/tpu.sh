#!/usr/bin/env bash
# Run `gfn-jax train` on every worker of a Cloud TPU VM (single host or pod slice).
#
# Usage:
#   launch/tpu.sh --tpu NAME --zone ZONE [--project PROJECT] [--repo GIT_URL] \
#       [--ref BRANCH] [--remote-dir DIR] [--no-setup] [--dry-run] -- <gfn-jax train args>
#
# Example (v4-32: 4 hosts x 4 chips = 16 devices; fsdp over 16):
#   launch/tpu.sh --tpu my-v4-32 --zone us-central2-b -- \
#       --config configs/rng.py --workdir gs://my-bucket/runs/rng \
#       --config.mesh.data=1 --config.mesh.fsdp=16 --config.train.steps=1000
#
# What it does, on all workers at once (gcloud ... tpu-vm ssh --worker=all):
#   1. copies the code: clone GIT_URL into DIR and check out REF (branch, tag or commit)
#      when --repo is given, else
#      the local checkout this script lives in (tracked files, `git archive` + scp);
#   2. set-up (skip with --no-setup): `pip install -e DIR "jax[tpu]"`;
#   3. runs `gfn-jax train <args>` with GFN_JAX_DISTRIBUTED=auto, so every worker calls
#      jax.distributed.initialize() and JAX reads the pod layout from the TPU metadata.
# Everything after `--` is passed to `gfn-jax train` unchanged (config overrides such as
# --config.mesh.tensor=4). Use a gs:// workdir (or a shared disk) so all hosts see it.
# Environment: TPU_NAME, TPU_ZONE, TPU_PROJECT may replace the flags; JAX_TPU_EXTRA
# (default "jax[tpu]") is the pip requirement that brings libtpu.
set -euo pipefail

TPU="${TPU_NAME:-}"
ZONE="${TPU_ZONE:-}"
PROJECT="${TPU_PROJECT:-}"
REPO=""
REF="main"
REMOTE_DIR="gfn-jax"          # relative to the remote user's home directory
SETUP=1
DRY_RUN=0
JAX_TPU_EXTRA="${JAX_TPU_EXTRA:-jax[tpu]}"

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) TPU="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --repo) REPO="$2"; shift 2 ;;
    --ref) REF="$2"; shift 2 ;;
    --remote-dir) REMOTE_DIR="$2"; shift 2 ;;
    --no-setup) SETUP=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (put gfn-jax arguments after --)" >&2; usage >&2; exit 2 ;;
  esac
done

if [[ -z "$TPU" || -z "$ZONE" ]]; then
  echo "error: --tpu and --zone (or TPU_NAME and TPU_ZONE) are required" >&2
  exit 2
fi

GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project "$PROJECT")

run() {  # print, or run, a command
  if [[ "$DRY_RUN" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

# Quote the pass-through arguments for the remote shell.
TRAIN_ARGS=""
for a in "$@"; do TRAIN_ARGS+=" $(printf '%q' "$a")"; done
RDIR="$(printf '%q' "$REMOTE_DIR")"

# 1. code
if [[ -n "$REPO" ]]; then
  QREF="$(printf '%q' "$REF")"
  FETCH="if [ ! -d $RDIR/.git ]; then git clone -q $(printf '%q' "$REPO") $RDIR; fi && git -C $RDIR fetch -q origin $QREF && git -C $RDIR checkout -q FETCH_HEAD"
  run "${GCLOUD[@]}" ssh "$TPU" "${COMMON[@]}" --worker=all --command "$FETCH"
else
  HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  TARBALL="$(mktemp -t gfn-jax-XXXXXX.tar.gz)"
  trap 'rm -f "$TARBALL"' EXIT
  run git -C "$HERE" archive --format=tar.gz -o "$TARBALL" HEAD
  run "${GCLOUD[@]}" scp "$TARBALL" "$TPU:gfn-jax-src.tar.gz" "${COMMON[@]}" --worker=all
  run "${GCLOUD[@]}" ssh "$TPU" "${COMMON[@]}" --worker=all \
    --command "mkdir -p $RDIR && tar -xzf gfn-jax-src.tar.gz -C $RDIR && rm gfn-jax-src.tar.gz"
fi

# 2. set-up
if [[ "$SETUP" == 1 ]]; then
  run "${GCLOUD[@]}" ssh "$TPU" "${COMMON[@]}" --worker=all \
    --command "python3 -m pip install -q --upgrade pip && python3 -m pip install -q -e $RDIR $(printf '%q' "$JAX_TPU_EXTRA")"
fi

# 3. train on all workers at once
run "${GCLOUD[@]}" ssh "$TPU" "${COMMON[@]}" --worker=all \
  --command "cd $RDIR && export GFN_JAX_DISTRIBUTED=auto PATH=\"\$HOME/.local/bin:\$PATH\" && gfn-jax train$TRAIN_ARGS"
