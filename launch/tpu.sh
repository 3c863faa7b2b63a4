#!/usr/bin/env bash
# Run `gfn-jax train` on every worker of a Cloud TPU VM (single host or pod slice), and keep
# it running through preemptions: recreate the TPU (or its queued resource) and resume from
# the last checkpoint, in a loop, until the run is finished.
#
# Usage:
#   launch/tpu.sh --tpu NAME --zone ZONE [--project PROJECT] [--repo GIT_URL] [--ref BRANCH]
#       [--remote-dir DIR] [--no-setup] [--dry-run]
#       [--accelerator-type TYPE --runtime-version VERSION [--spot | --preemptible]]
#       [--queued-resource QR_ID [--slices N]] [--max-restarts N] [--max-failures N]
#       [--poll SECONDS] -- <gfn-jax train args, including --workdir>
#
# Example (a v4-32 spot slice: 4 hosts x 4 chips; recreated when preempted):
#   launch/tpu.sh --tpu my-v4-32 --zone us-central2-b --accelerator-type v4-32 \
#       --runtime-version tpu-ubuntu2204-base --spot -- \
#       --config configs/rng.py --workdir gs://my-bucket/runs/rng \
#       --config.mesh.data=1 --config.mesh.fsdp=16 --config.train.steps=1000
#
# Example (Multislice: two v5p-64 slices joined by the data-center network, as one queued
# resource; the slices go along the mesh's data axis, so mesh.data must be a multiple of 2;
# plan it first with `gfn-jax plan ... --target 2xv5p-64`):
#   launch/tpu.sh --tpu my-v5p --zone us-east5-a --queued-resource my-qr --slices 2 \
#       --accelerator-type v5p-64 --runtime-version v2-alpha-tpuv5 --spot -- \
#       --config configs/rng.py --workdir gs://my-bucket/runs/rng-2x \
#       --config.mesh.data=2 --config.mesh.fsdp=32
#
# Each attempt, on all workers at once (gcloud ... tpu-vm ssh --worker=all):
#   0. makes sure the TPU is READY: waits while it is being created or repaired; when it is
#      missing, PREEMPTED or TERMINATED, deletes and recreates it (needs --accelerator-type
#      and --runtime-version), or, with --queued-resource, deletes and recreates the queued
#      resource (node id = --tpu) when it is SUSPENDED or FAILED and waits until ACTIVE;
#      with --slices N (N > 1, needs --queued-resource) the queued resource holds N slices
#      of --accelerator-type (nodes --tpu-0 ... --tpu-<N-1>), and the steps below reach
#      every worker of every slice (gcloud ... queued-resources ssh --node=all --worker=all);
#   1. copies the code (after every (re)creation): clone GIT_URL at REF with --repo, else the
#      local checkout this script lives in (tracked files at HEAD, `git archive` + scp);
#   2. set-up (skip with --no-setup): `pip install -e DIR "jax[tpu]"`;
#   3. runs `gfn-jax train <args>` with GFN_JAX_DISTRIBUTED=auto (every worker calls
#      jax.distributed.initialize(); JAX reads the pod layout, and with several slices
#      each slice's id and the coordinator, from the TPU metadata); the trainer resumes
#      from the workdir's latest checkpoint by itself;
#   4. asks worker 0 whether the run is finished (`python3 gfn_jax/sweep.py status WORKDIR`:
#      a DONE file, or a final summary.json with steps == train.steps). If it is,
#      the script exits 0; if not (preempted, SIGTERM, lost ssh), it goes back to 0.
# A training failure on a healthy (READY) TPU counts against --max-failures (default 2), so
# a broken config does not loop (exit 3, gfn-jax's "preempted, checkpoint saved", does not
# count); every retry counts against --max-restarts (default 50). After this script deleted
# the old TPU, training gets --force_unlock: the run-dir lock's holder died with that VM
# (GFN_JAX_FORCE_UNLOCK=0 turns this off).
# The workdir must outlive the VM: use gs://... (or another shared disk).
# --dry-run prints every gcloud / git command of one attempt instead of running it (the TPU
# is taken as missing when --accelerator-type is given, else as READY, and the run as
# finished after one attempt).
# Environment: TPU_NAME, TPU_ZONE, TPU_PROJECT may replace the flags; JAX_TPU_EXTRA
# (default "jax[tpu]") is the pip requirement that brings libtpu; GCLOUD (default gcloud).
set -euo pipefail

TPU="${TPU_NAME:-}"
ZONE="${TPU_ZONE:-}"
PROJECT="${TPU_PROJECT:-}"
REPO=""
REF="main"
REMOTE_DIR="gfn-jax"          # relative to the remote user's home directory
SETUP=1
DRY_RUN=0
ACCEL=""
RUNTIME=""
PRICING=""                    # --spot | --preemptible
QR=""
SLICES=1
MAX_RESTARTS=50
MAX_FAILURES=2
POLL=30
JAX_TPU_EXTRA="${JAX_TPU_EXTRA:-jax[tpu]}"
GCLOUD_BIN="${GCLOUD:-gcloud}"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
log() { echo "[tpu.sh $(date +%H:%M:%S)] $*" >&2; }

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
    --accelerator-type) ACCEL="$2"; shift 2 ;;
    --runtime-version|--version) RUNTIME="$2"; shift 2 ;;
    --spot) PRICING="--spot"; shift ;;
    --preemptible) PRICING="--preemptible"; shift ;;
    --queued-resource) QR="$2"; shift 2 ;;
    --slices) SLICES="$2"; shift 2 ;;
    --max-restarts) MAX_RESTARTS="$2"; shift 2 ;;
    --max-failures) MAX_FAILURES="$2"; shift 2 ;;
    --poll) POLL="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (put gfn-jax arguments after --)" >&2; usage >&2; exit 2 ;;
  esac
done

if [[ -z "$TPU" || -z "$ZONE" ]]; then
  echo "error: --tpu and --zone (or TPU_NAME and TPU_ZONE) are required" >&2
  exit 2
fi
CAN_CREATE=0
if [[ -n "$ACCEL" || -n "$RUNTIME" ]]; then
  if [[ -z "$ACCEL" || -z "$RUNTIME" ]]; then
    echo "error: (re)creating the TPU needs both --accelerator-type and --runtime-version" >&2
    exit 2
  fi
  CAN_CREATE=1
fi
if [[ -n "$QR" && "$CAN_CREATE" == 0 ]]; then
  echo "error: --queued-resource needs --accelerator-type and --runtime-version" >&2
  exit 2
fi
if ! [[ "$SLICES" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: --slices takes a positive integer (got '$SLICES')" >&2
  exit 2
fi
if [[ "$SLICES" -gt 1 && -z "$QR" ]]; then
  echo "error: --slices $SLICES (Multislice) needs --queued-resource: Cloud TPU creates several slices only as one queued resource" >&2
  exit 2
fi
if [[ -n "$QR" && "$PRICING" == "--preemptible" ]]; then
  echo "error: a queued resource takes --spot, not --preemptible" >&2
  exit 2
fi

# The workdir (for the "finished?" check) from the pass-through arguments.
WORKDIR=""
prev=""
for a in "$@"; do
  if [[ "$prev" == "--workdir" ]]; then WORKDIR="$a"; fi
  case "$a" in --workdir=*) WORKDIR="${a#--workdir=}" ;; esac
  prev="$a"
done
if [[ -z "$WORKDIR" ]]; then
  echo "error: pass --workdir to gfn-jax (after --); it is how a resumed run finds its checkpoints" >&2
  exit 2
fi
if [[ "$CAN_CREATE" == 1 && "$WORKDIR" != gs://* ]]; then
  log "warning: workdir $WORKDIR is not on gs://; a recreated TPU VM starts with an empty disk"
fi

TPUVM=("$GCLOUD_BIN" compute tpus tpu-vm)
QRCMD=("$GCLOUD_BIN" compute tpus queued-resources)
COMMON=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project "$PROJECT")

run() {  # print, or run, a command
  if [[ "$DRY_RUN" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

# Quote the pass-through arguments for the remote shell.
TRAIN_ARGS=""
for a in "$@"; do TRAIN_ARGS+=" $(printf '%q' "$a")"; done
RDIR="$(printf '%q' "$REMOTE_DIR")"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARBALL=""
trap '[[ -n "$TARBALL" ]] && rm -f "$TARBALL"' EXIT

# ---------------------------------------------------------------- TPU state
STATE=""
get_state() {  # sets STATE (NOT_FOUND when describe fails)
  local cmd
  if [[ -n "$QR" ]]; then
    cmd=("${QRCMD[@]}" describe "$QR" "${COMMON[@]}" --format="value(state.state)")
  else
    cmd=("${TPUVM[@]}" describe "$TPU" "${COMMON[@]}" --format="value(state)")
  fi
  if [[ "$DRY_RUN" == 1 ]]; then
    run "${cmd[@]}"
    if [[ "$CAN_CREATE" == 1 && -z "${DRY_STATE_SEEN:-}" ]]; then STATE=NOT_FOUND; else STATE=READY; fi
    DRY_STATE_SEEN=1
    [[ -n "$QR" && "$STATE" == READY ]] && STATE=ACTIVE
    return 0
  fi
  STATE="$("${cmd[@]}" 2>/dev/null)" || STATE=NOT_FOUND
  STATE="${STATE//[[:space:]]/}"
  [[ -z "$STATE" ]] && STATE=NOT_FOUND
  return 0
}

create() {
  if [[ "$SLICES" -gt 1 ]]; then  # nodes $TPU-0 ... $TPU-<N-1>, one per slice
    run "${QRCMD[@]}" create "$QR" --node-count "$SLICES" --node-prefix "$TPU" "${COMMON[@]}" \
      --accelerator-type "$ACCEL" --runtime-version "$RUNTIME" ${PRICING:+"$PRICING"}
  elif [[ -n "$QR" ]]; then
    run "${QRCMD[@]}" create "$QR" --node-id "$TPU" "${COMMON[@]}" \
      --accelerator-type "$ACCEL" --runtime-version "$RUNTIME" ${PRICING:+"$PRICING"}
  else
    run "${TPUVM[@]}" create "$TPU" "${COMMON[@]}" \
      --accelerator-type "$ACCEL" --version "$RUNTIME" ${PRICING:+"$PRICING"}
  fi
}

delete() {
  FORCE_UNLOCK="${GFN_JAX_FORCE_UNLOCK:-1}"  # the old VM, and the lock holder on it, are gone
  if [[ -n "$QR" ]]; then
    run "${QRCMD[@]}" delete "$QR" "${COMMON[@]}" --force --quiet || true
  else
    run "${TPUVM[@]}" delete "$TPU" "${COMMON[@]}" --quiet || true
  fi
}

FRESH=1  # the code must be (re)copied and set up
FORCE_UNLOCK=0  # 1 once this script deleted the TPU: the run-dir lock's holder is gone
ensure_ready() {  # returns once the TPU is usable; recreates it when it is gone
  while :; do
    get_state
    case "$STATE" in
      READY|ACTIVE) return 0 ;;
      CREATING|STARTING|RESTARTING|REPAIRING|PROVISIONING|WAITING_FOR_RESOURCES|ACCEPTED|DELETING|SUSPENDING)
        log "TPU ${QR:-$TPU} is $STATE; waiting" ;;
      STOPPED)
        if [[ -n "$QR" ]]; then log "queued resource $QR is STOPPED"; return 1; fi
        log "TPU $TPU is STOPPED; starting it"
        run "${TPUVM[@]}" start "$TPU" "${COMMON[@]}"; FRESH=1 ;;
      *)  # NOT_FOUND, PREEMPTED, TERMINATED, SUSPENDED, FAILED, ...
        if [[ "$CAN_CREATE" != 1 ]]; then
          log "error: TPU ${QR:-$TPU} is $STATE and cannot be recreated without" \
              "--accelerator-type and --runtime-version"
          return 1
        fi
        if [[ "$STATE" != NOT_FOUND ]]; then
          log "TPU ${QR:-$TPU} is $STATE; deleting it"
          delete
        fi
        log "creating ${QR:+queued resource $QR for }TPU $TPU ($([[ "$SLICES" -gt 1 ]] && echo "$SLICES x ")$ACCEL, $RUNTIME${PRICING:+, ${PRICING#--}})"
        create || log "create failed; will retry"
        FRESH=1 ;;
    esac
    [[ "$DRY_RUN" == 1 ]] && continue
    sleep "$POLL"
  done
}

# ---------------------------------------------------------------- remote steps
# every worker (of every slice); one worker (worker 0 of the first slice)
if [[ "$SLICES" -gt 1 ]]; then
  ssh_all() { run "${QRCMD[@]}" ssh "$QR" "${COMMON[@]}" --node=all --worker=all --command "$1"; }
  ssh_first() { run "${QRCMD[@]}" ssh "$QR" "${COMMON[@]}" --node=0 --worker=0 --command "$1"; }
  scp_all() { run "${QRCMD[@]}" scp "$1" "$QR:$2" "${COMMON[@]}" --node=all --worker=all; }
else
  ssh_all() { run "${TPUVM[@]}" ssh "$TPU" "${COMMON[@]}" --worker=all --command "$1"; }
  ssh_first() { run "${TPUVM[@]}" ssh "$TPU" "${COMMON[@]}" --worker=0 --command "$1"; }
  scp_all() { run "${TPUVM[@]}" scp "$1" "$TPU:$2" "${COMMON[@]}" --worker=all; }
fi

copy_code() {
  if [[ -n "$REPO" ]]; then
    local qref
    qref="$(printf '%q' "$REF")"
    ssh_all "if [ ! -d $RDIR/.git ]; then git clone -q $(printf '%q' "$REPO") $RDIR; fi && git -C $RDIR fetch -q origin $qref && git -C $RDIR checkout -q FETCH_HEAD"
  else
    if [[ -z "$TARBALL" ]]; then
      if [[ "$DRY_RUN" == 1 ]]; then TARBALL="$(mktemp -u -t gfn-jax-XXXXXX.tar.gz)"
      else TARBALL="$(mktemp -t gfn-jax-XXXXXX.tar.gz)"; fi
      run git -C "$HERE" archive --format=tar.gz -o "$TARBALL" HEAD
    fi
    scp_all "$TARBALL" gfn-jax-src.tar.gz
    ssh_all "mkdir -p $RDIR && tar -xzf gfn-jax-src.tar.gz -C $RDIR && rm gfn-jax-src.tar.gz"
  fi
}

setup() {
  ssh_all "python3 -m pip install -q --upgrade pip && python3 -m pip install -q -e $RDIR $(printf '%q' "$JAX_TPU_EXTRA")"
}

train() {
  local extra=""
  [[ "$FORCE_UNLOCK" == 1 ]] && extra=" --force_unlock"
  ssh_all "cd $RDIR && export GFN_JAX_DISTRIBUTED=auto PATH=\"\$HOME/.local/bin:\$PATH\" && gfn-jax train$TRAIN_ARGS$extra"
}

finished() {  # worker 0 reads the workdir; no JAX import
  ssh_first "cd $RDIR && python3 gfn_jax/sweep.py status $(printf '%q' "$WORKDIR")"
}

# ---------------------------------------------------------------- the loop
attempt=0
failures=0
while :; do
  attempt=$((attempt + 1))
  log "attempt $attempt: TPU ${QR:+$QR/}$TPU, workdir $WORKDIR"
  if ! ensure_ready; then exit 1; fi
  if [[ "$FRESH" == 1 ]]; then
    if copy_code && { [[ "$SETUP" == 0 ]] || setup; }; then
      FRESH=0
    else
      log "copying the code or set-up failed"
    fi
  fi
  rc=0
  if [[ "$FRESH" == 0 ]]; then
    train || rc=$?
  else
    rc=1
  fi
  if [[ "$DRY_RUN" == 1 ]]; then
    finished
    log "dry run: one attempt shown; the real loop repeats it until the status check says finished"
    exit 0
  fi
  if finished; then
    log "run finished (attempt $attempt)"
    exit 0
  fi
  sleep "$POLL"  # give a preemption time to show in the TPU's state
  get_state
  # exit 3 is gfn-jax's "preempted: checkpoint saved" (SIGTERM), not a failure
  if [[ "$rc" != 0 && "$rc" != 3 && ( "$STATE" == READY || "$STATE" == ACTIVE ) ]]; then
    failures=$((failures + 1))
    log "training exited with $rc on a healthy TPU (failure $failures of $MAX_FAILURES)"
    if (( failures >= MAX_FAILURES )); then
      log "error: giving up: training keeps failing on a healthy TPU (see its output above)"
      exit 1
    fi
  else
    failures=0
    log "run not finished (exit $rc, TPU $STATE): resuming"
  fi
  if (( attempt > MAX_RESTARTS )); then
    log "error: giving up after $MAX_RESTARTS restarts"
    exit 1
  fi
done
