"""launch/tpu.sh and launch/slurm.sh: dry runs print the right commands, and, with fake
``gcloud`` / ``srun`` / ``scontrol`` on PATH, one simulated preemption is followed by a
recreated TPU (or a requeued job) that resumes and finishes.

Only fakes are used here: nothing in this file talks to Google Cloud or a SLURM cluster.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_SH = os.path.join(REPO, "launch", "tpu.sh")
SLURM_SH = os.path.join(REPO, "launch", "slurm.sh")
TRAIN = ["--config", "configs/rng.py", "--workdir", "gs://bkt/runs/rng",
         "--config.train.steps=1000", "--config.mesh.fsdp=16"]


def _exe(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _lines(text):
    return [shlex.split(x) for x in text.strip().splitlines() if x and not x.startswith("#")]


# ---------------------------------------------------------------------------
# TPU
# ---------------------------------------------------------------------------
FAKE_GCLOUD = r"""#!/usr/bin/env bash
# fake gcloud: logs every call; a TPU VM / queued resource whose state lives in files
d="$FAKE_DIR"
printf '%q ' "$@" >> "$d/gcloud.log"; echo >> "$d/gcloud.log"
[[ "$FAKE_MODE" == forbid ]] && exit 99
get() { cat "$d/$1" 2>/dev/null || echo NOT_FOUND; }
kind="$3"; verb="$4"
if [[ "$kind" == queued-resources ]]; then f=qr_state; else f=tpu_state; fi
cmd=""; prev=""
for a in "$@"; do [[ "$prev" == --command ]] && cmd="$a"; prev="$a"; done
case "$verb" in
  describe)
    s="$(get $f)"
    if [[ "$s" == NOT_FOUND ]]; then echo "ERROR: not found" >&2; exit 1; fi
    case "$s" in  # a new resource becomes usable on the next describe
      CREATING) echo READY > "$d/$f" ;;
      WAITING_FOR_RESOURCES) echo ACTIVE > "$d/$f" ;;
    esac
    echo "$s" ;;
  create) if [[ "$kind" == queued-resources ]]; then echo WAITING_FOR_RESOURCES > "$d/$f"
          else echo CREATING > "$d/$f"; fi ;;
  delete) echo NOT_FOUND > "$d/$f" ;;
  scp) ;;
  ssh)
    if [[ "$cmd" == *"gfn-jax train"* ]]; then
      n=$(( $(cat "$d/trains" 2>/dev/null || echo 0) + 1 )); echo $n > "$d/trains"
      if [[ "$FAKE_MODE" == fail ]]; then exit 1; fi
      if [[ "$FAKE_MODE" == sigterm && $n == 1 ]]; then exit 3; fi  # VM stays READY
      if [[ $n == 1 ]]; then  # preempted mid-run: the VM goes away, ssh drops
        if [[ -f "$d/qr_state" ]]; then echo SUSPENDED > "$d/qr_state"
        else echo PREEMPTED > "$d/tpu_state"; fi
        exit 255
      fi
      touch "$d/finished"; exit 0
    elif [[ "$cmd" == *"sweep.py status"* ]]; then
      [[ -f "$d/finished" ]] && exit 0 || exit 1
    fi ;;
esac
exit 0
"""


@pytest.fixture
def fake_gcloud(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _exe(bin_dir / "gcloud", FAKE_GCLOUD)
    state = tmp_path / "state"
    state.mkdir()

    def run(args, mode="", tpu_state=None, qr_state=None, timeout=120):
        if tpu_state:
            (state / "tpu_state").write_text(tpu_state + "\n")
        if qr_state:
            (state / "qr_state").write_text(qr_state + "\n")
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_DIR=str(state),
                   FAKE_MODE=mode)
        for k in ("TPU_NAME", "TPU_ZONE", "TPU_PROJECT"):
            env.pop(k, None)
        out = subprocess.run(["bash", TPU_SH] + args, env=env, capture_output=True, text=True,
                             timeout=timeout)
        log = state / "gcloud.log"
        calls = [shlex.split(x) for x in log.read_text().splitlines()] if log.exists() else []
        return out, calls

    run.state = state
    return run


def _verb(call):
    """A short name for one gcloud call: 'describe', 'create', 'ssh:train', ..."""
    if call[0] == "gcloud":  # a printed command line (the fake's log omits the program)
        call = call[1:]
    verb = call[3]
    if verb == "ssh":
        cmd = call[call.index("--command") + 1]
        for key, name in (("gfn-jax train", "train"), ("sweep.py status", "status"),
                          ("pip install", "setup"), ("tar -xzf", "untar"), ("git clone", "clone")):
            if key in cmd:
                return f"ssh:{name}"
    return verb


def test_tpu_dry_run_prints_every_command(fake_gcloud):
    out, calls = fake_gcloud(["--tpu", "t1", "--zone", "us-central2-b", "--project", "p",
                              "--accelerator-type", "v4-32", "--runtime-version", "rt-1",
                              "--spot", "--dry-run", "--"] + TRAIN, mode="forbid")
    assert out.returncode == 0, out.stderr
    assert calls == []  # nothing was run
    lines = _lines(out.stdout)
    common = ["--zone", "us-central2-b", "--project", "p"]
    assert lines[0] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "t1"] + common + [
        "--format=value(state)"]
    assert lines[1] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "t1"] + common + [
        "--accelerator-type", "v4-32", "--version", "rt-1", "--spot"]
    assert lines[2] == lines[0]
    assert lines[3][:3] == ["git", "-C", REPO] and lines[3][3:6] == ["archive", "--format=tar.gz", "-o"]
    assert lines[4][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    ssh = [x for x in lines if x[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    assert [_verb(x) for x in ssh] == ["ssh:untar", "ssh:setup", "ssh:train", "ssh:status"]
    train = ssh[2]
    assert train[5:10] == ["t1"] + common and "--worker=all" in train
    remote = train[train.index("--command") + 1]
    assert "GFN_JAX_DISTRIBUTED=auto" in remote
    assert remote.endswith("gfn-jax train " + " ".join(TRAIN))
    status = ssh[3]
    assert "--worker=0" in status
    assert status[-1] == "cd gfn-jax && python3 gfn_jax/sweep.py status gs://bkt/runs/rng"
    assert len(lines) == 9


def test_tpu_preempted_once_is_recreated_and_resumed(fake_gcloud):
    out, calls = fake_gcloud(["--tpu", "t1", "--zone", "z", "--accelerator-type", "v4-8",
                              "--runtime-version", "rt", "--spot", "--poll", "0", "--"] + TRAIN,
                             tpu_state="READY")
    assert out.returncode == 0, out.stderr
    assert [_verb(c) for c in calls] == [
        # attempt 1: ready; copy, set up, train -- preempted; not finished
        "describe", "scp", "ssh:untar", "ssh:setup", "ssh:train", "ssh:status", "describe",
        # attempt 2: PREEMPTED -> delete, recreate, wait until READY, copy again, resume
        "describe", "delete", "create", "describe", "describe",
        "scp", "ssh:untar", "ssh:setup", "ssh:train", "ssh:status"]
    trains = [c for c in calls if _verb(c) == "ssh:train"]
    # the same command -- the trainer resumes by itself -- plus --force_unlock: the lock's
    # holder died with the deleted VM
    assert trains[1][:-1] == trains[0][:-1]
    assert trains[1][-1] == trains[0][-1] + " --force_unlock"
    assert trains[0][-1].endswith(" ".join(TRAIN))
    create = next(c for c in calls if c[3] == "create")
    assert create[4:] == ["t1", "--zone", "z", "--accelerator-type", "v4-8", "--version", "rt",
                          "--spot"]
    assert "run not finished (exit 255, TPU PREEMPTED): resuming" in out.stderr
    assert "run finished (attempt 2)" in out.stderr


def test_tpu_queued_resource_is_recreated_when_suspended(fake_gcloud):
    out, calls = fake_gcloud(["--tpu", "node1", "--zone", "z", "--queued-resource", "qr1",
                              "--accelerator-type", "v5litepod-16", "--runtime-version", "rt",
                              "--spot", "--poll", "0", "--"] + TRAIN, qr_state="ACTIVE")
    assert out.returncode == 0, out.stderr
    kinds = [(c[2], _verb(c)) for c in calls]
    assert kinds == [
        ("queued-resources", "describe"), ("tpu-vm", "scp"), ("tpu-vm", "ssh:untar"),
        ("tpu-vm", "ssh:setup"), ("tpu-vm", "ssh:train"), ("tpu-vm", "ssh:status"),
        ("queued-resources", "describe"),
        ("queued-resources", "describe"), ("queued-resources", "delete"),
        ("queued-resources", "create"), ("queued-resources", "describe"),
        ("queued-resources", "describe"),
        ("tpu-vm", "scp"), ("tpu-vm", "ssh:untar"), ("tpu-vm", "ssh:setup"),
        ("tpu-vm", "ssh:train"), ("tpu-vm", "ssh:status")]
    assert calls[0][5:] == ["--zone", "z", "--format=value(state.state)"]
    delete = calls[8]
    assert delete[4:] == ["qr1", "--zone", "z", "--force", "--quiet"]
    create = calls[9]
    assert create[4:] == ["qr1", "--node-id", "node1", "--zone", "z", "--accelerator-type",
                          "v5litepod-16", "--runtime-version", "rt", "--spot"]


def test_tpu_multislice_queued_resource_reaches_every_slice(fake_gcloud):
    """--slices 2: one queued resource of two slices (--node-count / --node-prefix); the code
    copy, set-up and training reach every worker of every node, the status check worker 0
    of node 0; a suspended resource is recreated whole and the run resumed."""
    args = ["--tpu", "gfn", "--zone", "z", "--queued-resource", "qr2", "--slices", "2",
            "--accelerator-type", "v5p-16", "--runtime-version", "rt", "--spot", "--poll", "0",
            "--"] + TRAIN
    out, calls = fake_gcloud(args, qr_state="ACTIVE")
    assert out.returncode == 0, out.stderr
    assert {c[2] for c in calls} == {"queued-resources"}  # no per-VM command
    assert [_verb(c) for c in calls] == [
        "describe", "scp", "ssh:untar", "ssh:setup", "ssh:train", "ssh:status", "describe",
        "describe", "delete", "create", "describe", "describe",
        "scp", "ssh:untar", "ssh:setup", "ssh:train", "ssh:status"]
    create = next(c for c in calls if c[3] == "create")
    assert create[4:] == ["qr2", "--node-count", "2", "--node-prefix", "gfn", "--zone", "z",
                          "--accelerator-type", "v5p-16", "--runtime-version", "rt", "--spot"]
    for c in calls:
        if c[3] == "scp":
            assert c[5] == "qr2:gfn-jax-src.tar.gz" and c[-2:] == ["--node=all", "--worker=all"]
        if _verb(c) in ("ssh:untar", "ssh:setup", "ssh:train"):
            assert c[4] == "qr2" and "--node=all" in c and "--worker=all" in c
        if _verb(c) == "ssh:status":
            assert "--node=0" in c and "--worker=0" in c
    assert "creating queued resource qr2 for TPU gfn (2 x v5p-16, rt, spot)" in out.stderr

    (fake_gcloud.state / "gcloud.log").unlink()
    out, calls = fake_gcloud(args[:-len(TRAIN) - 1] + ["--dry-run", "--"] + TRAIN,
                             mode="forbid")
    assert out.returncode == 0 and calls == [], out.stderr
    lines = _lines(out.stdout)
    assert lines[1][:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert "--node-count" in lines[1] and "--node-id" not in lines[1]


def test_tpu_sigterm_exit_3_on_a_healthy_tpu_is_resumed_not_a_failure(fake_gcloud):
    out, calls = fake_gcloud(["--tpu", "t1", "--zone", "z", "--poll", "0", "--max-failures",
                              "1", "--"] + TRAIN, mode="sigterm", tpu_state="READY")
    assert out.returncode == 0, out.stderr
    assert [_verb(c) for c in calls] == [
        "describe", "scp", "ssh:untar", "ssh:setup", "ssh:train", "ssh:status", "describe",
        "describe", "ssh:train", "ssh:status"]  # same VM: no new copy, no --force_unlock
    trains = [c for c in calls if _verb(c) == "ssh:train"]
    assert trains[0] == trains[1] and "--force_unlock" not in trains[1][-1]


def test_tpu_failing_training_on_a_healthy_tpu_gives_up(fake_gcloud):
    out, calls = fake_gcloud(["--tpu", "t1", "--zone", "z", "--poll", "0", "--no-setup",
                              "--max-failures", "2", "--"] + TRAIN, mode="fail",
                             tpu_state="READY")
    assert out.returncode == 1
    assert [_verb(c) for c in calls].count("ssh:train") == 2
    assert "ssh:setup" not in [_verb(c) for c in calls]
    assert "giving up: training keeps failing on a healthy TPU" in out.stderr


def test_tpu_preempted_without_create_options_stops(fake_gcloud):
    out, calls = fake_gcloud(["--tpu", "t1", "--zone", "z", "--"] + TRAIN, tpu_state="PREEMPTED")
    assert out.returncode == 1
    assert [_verb(c) for c in calls] == ["describe"]
    assert "cannot be recreated without --accelerator-type and --runtime-version" in out.stderr


def test_tpu_argument_errors(fake_gcloud):
    out, _ = fake_gcloud(["--tpu", "t", "--zone", "z", "--", "--config", "c.py"], mode="forbid")
    assert out.returncode == 2 and "pass --workdir" in out.stderr
    out, _ = fake_gcloud(["--tpu", "t", "--zone", "z", "--accelerator-type", "v4-8", "--"] + TRAIN,
                         mode="forbid")
    assert out.returncode == 2 and "needs both --accelerator-type and --runtime-version" in out.stderr
    out, _ = fake_gcloud(["--zone", "z", "--"] + TRAIN, mode="forbid")
    assert out.returncode == 2 and "--tpu and --zone" in out.stderr
    out, _ = fake_gcloud(["--tpu", "t", "--zone", "z", "--slices", "2", "--accelerator-type",
                          "v5p-16", "--runtime-version", "rt", "--"] + TRAIN, mode="forbid")
    assert out.returncode == 2 and "needs --queued-resource" in out.stderr
    out, _ = fake_gcloud(["--tpu", "t", "--zone", "z", "--slices", "0", "--"] + TRAIN,
                         mode="forbid")
    assert out.returncode == 2 and "--slices takes a positive integer" in out.stderr


# ---------------------------------------------------------------------------
# SLURM
# ---------------------------------------------------------------------------
FAKE_SRUN = r"""#!/usr/bin/env bash
printf '%q ' "$@" >> "$FAKE_DIR/srun.log"; echo >> "$FAKE_DIR/srun.log"
while [[ "$1" == --* ]]; do shift; done   # srun's own options
export SLURM_PROCID=0 SLURM_LOCALID=0
exec "$@"
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
printf '%q ' "$@" >> "$FAKE_DIR/scontrol.log"; echo >> "$FAKE_DIR/scontrol.log"
if [[ "$1 $2" == "show hostnames" ]]; then printf 'gpu-a01\ngpu-a02\n'; fi
exit 0
"""

# a stand-in for `gfn-jax train`: writes what the real trainer writes to its workdir
FAKE_TRAIN = r"""#!/usr/bin/env bash
d="$FAKE_DIR"; wd="$FAKE_WORKDIR"
n=$(( $(cat "$d/trains" 2>/dev/null || echo 0) + 1 )); echo $n > "$d/trains"
env | grep '^GFN_JAX_' | sort > "$d/env.$n"
printf '%s\n' "$@" > "$d/args.$n"
mkdir -p "$wd"; echo '{"train": {"steps": 3}}' > "$wd/config.json"
case "$FAKE_MODE" in
  preempt)  # run until SIGTERM, then save and exit 0 like the real trainer
    trap 'echo "{\"steps\": 1, \"preempted_at\": 1, \"eval\": {}, \"complete\": false}" > "$wd/summary.json"; echo TERM >> "$d/trainer.log"; exit 3' TERM
    touch "$d/started"
    while :; do sleep 0.05; done ;;
  finish) echo '{"steps": 3, "eval": {}, "complete": true}' > "$wd/summary.json"; exit 0 ;;
  fail) exit 1 ;;
  exit3) echo '{"steps": 2, "preempted_at": 2, "eval": {}, "complete": false}' > "$wd/summary.json"; exit 3 ;;
esac
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _exe(bin_dir / "srun", FAKE_SRUN)
    _exe(bin_dir / "scontrol", FAKE_SCONTROL)
    train = _exe(tmp_path / "fake_train", FAKE_TRAIN)
    state = tmp_path / "state"
    state.mkdir()
    workdir = tmp_path / "run"

    def env(mode, restarts=None, **extra):
        e = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_DIR=str(state),
                 FAKE_MODE=mode, FAKE_WORKDIR=str(workdir), SLURM_JOB_ID="4242",
                 SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_NTASKS="2", SLURM_SUBMIT_DIR=REPO,
                 GFN_JAX_CMD=str(train), GFN_JAX_PYTHON=sys.executable)
        for k in ("SLURM_RESTART_COUNT", "GFN_JAX_SETUP", "GFN_JAX_PIP_INSTALL", "GFN_JAX_PORT"):
            e.pop(k, None)
        if restarts is not None:
            e["SLURM_RESTART_COUNT"] = str(restarts)
        e.update(extra)
        return e

    def log(name):
        p = state / name
        return [shlex.split(x) for x in p.read_text().splitlines()] if p.exists() else []

    return env, log, state, workdir


def test_slurm_directives_come_before_any_command():
    lines = open(SLURM_SH).read().splitlines()
    first_cmd = next(i for i, x in enumerate(lines[1:], 1) if x.strip() and not x.startswith("#"))
    directives = [x for x in lines if x.startswith("#SBATCH")]
    assert all(lines.index(x) < first_cmd for x in directives)  # sbatch stops reading there
    assert "#SBATCH --requeue" in directives and "#SBATCH --signal=B:USR1@300" in directives
    assert "#SBATCH --open-mode=append" in directives


def test_slurm_dry_run_prints_commands(fake_slurm):
    env, log, _, _ = fake_slurm
    e = env("finish")
    for k in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NTASKS", "SLURM_SUBMIT_DIR"):
        e.pop(k)
    args = ["--config", "configs/rng.py", "--workdir", "runs/rng", "--config.train.steps=5"]
    out = subprocess.run(["bash", SLURM_SH, "--dry-run"] + args, env=e, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert log("srun.log") == [] and log("scontrol.log") == []  # nothing ran
    lines = _lines(out.stdout)
    assert lines[0] == ["sbatch", SLURM_SH] + args
    assert lines[1] == ["scontrol", "show", "hostnames", "$SLURM_JOB_NODELIST"]
    assert lines[2][:4] == ["srun", "--kill-on-bad-exit=1", "bash", "-c"]
    assert "exec $GFN_JAX_CMD" in lines[2][4] and lines[2][5:] == ["gfn-jax"] + args
    assert lines[3] == ["scontrol", "requeue", "$SLURM_JOB_ID"]
    assert "gfn_jax/sweep.py status runs/rng" in out.stdout
    # without --dry-run and outside SLURM it refuses
    out = subprocess.run(["bash", SLURM_SH] + args, env=e, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "run this script with sbatch" in out.stderr


def _start(env, args):
    return subprocess.Popen(["bash", SLURM_SH] + args, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path, proc, timeout=60.0):
    t0 = time.time()
    while not path.exists():
        if time.time() - t0 > timeout or proc.poll() is not None:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"{path} did not appear (exit {proc.returncode}): {out} {err}")
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_slurm_preemption_requeues_then_the_requeued_job_finishes(fake_slurm, sig):
    env, log, state, workdir = fake_slurm
    args = ["--config", "configs/rng.py", "--workdir", str(workdir), "--config.train.steps=3"]
    # the first job: preempted (SIGUSR1 near the time limit, or SIGTERM) while training
    p = _start(env("preempt"), args)
    _wait_for(state / "started", p)
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr
    assert (state / "trainer.log").read_text() == "TERM\n"  # the trainer was asked to save
    assert log("scontrol.log") == [["show", "hostnames", "gpu-a[01-02]"],
                                   ["requeue", "4242"]]
    assert "requeueing job 4242" in stderr
    env1 = dict(x.split("=", 1) for x in (state / "env.1").read_text().splitlines())
    assert env1["GFN_JAX_COORDINATOR"] == f"gpu-a01:{12000 + 4242 % 20000}"
    assert env1["GFN_JAX_NUM_PROCESSES"] == "2" and env1["GFN_JAX_PROCESS_ID"] == "0"
    assert (state / "args.1").read_text().splitlines() == args
    assert log("srun.log")[0][0] == "--kill-on-bad-exit=1"

    # the requeued job: resumes (same command) and finishes; no further requeue
    p = _start(env("finish", restarts=1), args)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr
    assert (state / "args.2").read_text().splitlines() == args + ["--force_unlock"]
    assert [c for c in log("scontrol.log") if c[0] == "requeue"] == [["requeue", "4242"]]
    assert "run finished" in stderr


def test_slurm_failure_is_not_requeued_and_requeues_are_bounded(fake_slurm):
    env, log, state, workdir = fake_slurm
    args = ["--config", "c.py", "--workdir", str(workdir)]
    out = subprocess.run(["bash", SLURM_SH] + args, env=env("fail"), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and "training failed (exit 1); not requeued" in out.stderr
    assert not [c for c in log("scontrol.log") if c[0] == "requeue"]
    assert "--force_unlock" not in (state / "args.1").read_text()
    # exit 3 ("preempted, checkpoint saved") without a signal to the job: requeued
    out = subprocess.run(["bash", SLURM_SH] + args, env=env("exit3"), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "training was preempted" in out.stderr, out.stderr
    assert [c for c in log("scontrol.log") if c[0] == "requeue"] == [["requeue", "4242"]]
    (state / "scontrol.log").unlink()
    # out of requeues: a preempted run is not requeued again
    p = _start(env("preempt", restarts=2, GFN_JAX_MAX_REQUEUES="2"), args)
    _wait_for(state / "started", p)
    p.send_signal(signal.SIGUSR1)
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 1 and "not finished after 2 requeues" in stderr
    assert not [c for c in log("scontrol.log") if c[0] == "requeue"]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["preempted_at"] == 1
