"""Run directories and outputs: lock, fresh runs, config changes on resume, atomic outputs,
one-line OS errors. Each test checks the message and that no data was lost or mixed."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from gfn_jax import rundir
from gfn_jax.rundir import (
    LOCK_NAME,
    MISSING,
    ConfigChangeError,
    ExistingRunError,
    OutputPathError,
    RunDirLocked,
    RunLock,
    atomic_output_dir,
    atomic_write_file,
    check_config_change,
    check_output_dir,
    check_writable,
    find_os_error,
    is_run_dir,
    one_line_os_error,
    prepare_fresh_run,
)

RUNDIR_PY = os.path.abspath(rundir.__file__)
HOST = socket.gethostname()


def snapshot(root):
    """{relative path: bytes} of every file under ``root`` (empty dirs as None)."""
    out = {}
    for r, dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(r, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
        if not dirs and not files:
            out[os.path.relpath(r, root) + "/"] = None
    return out


def make_run(d, steps=(50, 100)):
    """A directory that looks like a run: config, checkpoints, metrics, summary."""
    os.makedirs(d / "checkpoints", exist_ok=True)
    (d / "config.json").write_text(json.dumps({"seed": 0, "optim": {"lr": 1e-4}}))
    for s in steps:
        os.makedirs(d / "checkpoints" / str(s) / "state")
        (d / "checkpoints" / str(s) / "state" / "data").write_bytes(os.urandom(64))
    (d / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    (d / "summary.json").write_text("{}")
    return snapshot(d)


# --------------------------------------------------------------------------------------
# lock
# --------------------------------------------------------------------------------------

_HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("rundir", {path!r})
rundir = importlib.util.module_from_spec(spec)  # without importing gfn_jax (and JAX): fast
sys.modules["rundir"] = rundir
spec.loader.exec_module(rundir)
lock = rundir.RunLock({workdir!r}, command="gfn-jax train --workdir holder-test")
try:
    lock.acquire()
except rundir.RunDirLocked as e:
    print("REFUSED", e, flush=True)
    sys.exit(3)
print("LOCKED", flush=True)
if {hold}:
    time.sleep(600)
lock.release()
"""


def _spawn(tmp_path, workdir, hold=True):
    script = tmp_path / f"holder-{time.time_ns()}.py"
    script.write_text(_HOLDER.format(path=RUNDIR_PY, workdir=str(workdir), hold=hold))
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _first_line(proc, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line:
            return line.strip()
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"no output; stderr: {proc.stderr.read()[-2000:]}")


def test_lock_two_processes_and_dead_holder_takeover(tmp_path):
    work = tmp_path / "run"
    holder = _spawn(tmp_path, work)
    try:
        assert _first_line(holder) == "LOCKED"
        lock_path = work / LOCK_NAME
        held_bytes = lock_path.read_bytes()
        record = json.loads(held_bytes)
        assert record["pid"] == holder.pid and record["host"] == HOST
        # a second process is refused and told who holds it and what to do
        second = _spawn(tmp_path, work, hold=False)
        line = _first_line(second)
        assert second.wait(timeout=30) == 3
        assert line.startswith("REFUSED run directory ")
        assert re.search(rf"is locked by pid {holder.pid} on host {re.escape(HOST)} since "
                         rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d \(gfn-jax train --workdir holder-test\) "
                         rf"\(it is running\); wait for it to finish or stop it, or use another "
                         rf"--workdir; if that process is gone, delete .*{LOCK_NAME}$", line)
        # this process too, with the hint for the CLI's flag
        with pytest.raises(RunDirLocked, match=rf"pid {holder.pid} on host .* or pass --force_unlock$") as info:
            RunLock(work, force_hint="--force_unlock").acquire()
        assert info.value.holder["pid"] == holder.pid
        assert lock_path.read_bytes() == held_bytes  # refused attempts never touch it
    finally:
        holder.kill()
        holder.wait(timeout=30)
    # the holder died without releasing: its lock is taken over, with the reason recorded
    lock = RunLock(work, command="second")
    with lock:
        assert lock.took_over["pid"] == holder.pid
        assert lock.took_over["reason"] == f"process {holder.pid} is no longer running"
        rec = json.loads((work / LOCK_NAME).read_text())
        assert rec["pid"] == os.getpid() and rec["command"] == "second"
        # and now a new process is refused with *our* pid
        third = _spawn(tmp_path, work, hold=False)
        assert re.search(rf"REFUSED .*locked by pid {os.getpid()} ", _first_line(third))
        assert third.wait(timeout=30) == 3
    assert not (work / LOCK_NAME).exists()  # released
    with RunLock(work) as again:
        assert again.took_over is None


def test_lock_same_process_twice_is_refused(tmp_path):
    with RunLock(tmp_path / "w"):
        with pytest.raises(RunDirLocked, match=rf"locked by pid {os.getpid()} "):
            RunLock(tmp_path / "w").acquire()


def _fake_lock(work, **fields):
    os.makedirs(work, exist_ok=True)
    rec = {"pid": 12345, "host": HOST, "since": time.time() - 100, "command": "old"}
    rec.update(fields)
    (work / LOCK_NAME).write_text(json.dumps(rec))
    return rec


def test_lock_stale_same_host_pid_gone(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    _fake_lock(tmp_path, pid=p.pid)
    with RunLock(tmp_path) as lock:
        assert lock.took_over["reason"] == f"process {p.pid} is no longer running"
    # a live pid whose recorded start time differs is a reused pid: stale too
    _fake_lock(tmp_path, pid=os.getpid(), proc_start="1")
    if rundir._proc_start_time(os.getpid()) is not None:
        with RunLock(tmp_path) as lock:
            assert lock.took_over["pid"] == os.getpid()


def test_lock_other_host(tmp_path):
    rec = _fake_lock(tmp_path, host="gpu-node-7", pid=4242)
    before = (tmp_path / LOCK_NAME).read_bytes()
    with pytest.raises(RunDirLocked, match=r"locked by pid 4242 on host gpu-node-7 since .* \(old\) \(it is "
                       r"on another host, so it cannot be checked from here\); .*if that process is "
                       r"gone, delete .*gfn-jax.lock"):
        RunLock(tmp_path, stale_after_s=3600).acquire()
    assert (tmp_path / LOCK_NAME).read_bytes() == before
    # not refreshed for longer than stale_after_s: taken over
    old = time.time() - 7200
    os.utime(tmp_path / LOCK_NAME, (old, old))
    with RunLock(tmp_path, stale_after_s=3600) as lock:
        assert lock.took_over["host"] == "gpu-node-7"
        assert re.fullmatch(r"not refreshed for \d+ s \(> 3600 s\)", lock.took_over["reason"])
    _fake_lock(tmp_path, host="gpu-node-7")
    with RunLock(tmp_path, force=True) as lock:
        assert lock.took_over["reason"] == "forced"


def test_lock_non_primary_is_noop(tmp_path):
    with RunLock(tmp_path / "w", is_primary=False) as lock:
        assert not lock.held
        assert not (tmp_path / "w" / LOCK_NAME).exists()


def test_lock_heartbeat_refreshes(tmp_path):
    with RunLock(tmp_path) as lock:
        old = time.time() - 1000
        os.utime(tmp_path / LOCK_NAME, (old, old))
        lock.heartbeat()
        assert time.time() - os.path.getmtime(tmp_path / LOCK_NAME) < 60


# --------------------------------------------------------------------------------------
# fresh run in a used directory
# --------------------------------------------------------------------------------------


def test_is_run_dir(tmp_path):
    assert not is_run_dir(tmp_path / "missing")
    assert not is_run_dir(tmp_path)
    make_run(tmp_path / "r")
    assert is_run_dir(tmp_path / "r")


def test_fresh_run_refused_in_used_dir(tmp_path):
    work = tmp_path / "run"
    before = make_run(work)
    with pytest.raises(ExistingRunError) as info:
        prepare_fresh_run(work, "refuse")
    msg = str(info.value)
    assert msg == (f"--workdir {work} already holds a run (checkpoints/ (steps [50, 100]), config.json, "
                   f"metrics.jsonl, summary.json); a fresh run never mixes with it: pass a new "
                   f"--workdir, resume it (drop --noresume), or pass --move_aside to rename the old "
                   f"run to <workdir>.old-<time> and start fresh")
    assert snapshot(work) == before


def test_fresh_run_moves_whole_old_run_aside_under_lock(tmp_path):
    work = tmp_path / "run"
    before = make_run(work)
    with RunLock(work) as lock:
        moved = prepare_fresh_run(work, "move_aside", lock=lock)
        assert re.fullmatch(re.escape(str(work)) + r"\.old-\d{8}-\d{6}", moved)
        assert snapshot(moved) == before  # everything moved, byte for byte, and no lock file
        assert os.listdir(work) == [LOCK_NAME]  # fresh, still locked by us
        assert json.loads((work / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert lock.held
        with pytest.raises(RunDirLocked):
            RunLock(work).acquire()
        # nothing of the old run is left to mix with: asking again is a no-op
        assert prepare_fresh_run(work, "move_aside", lock=lock) is None
        # a second move in the same second gets its own name
        make_run(work, steps=(1,))
        moved2 = prepare_fresh_run(work, "move_aside", lock=lock)
        assert moved2 != moved and os.path.isdir(moved) and is_run_dir(moved2)
    assert not (work / LOCK_NAME).exists()


def test_fresh_run_empty_or_foreign_dir(tmp_path):
    assert prepare_fresh_run(tmp_path / "new", "refuse") is None
    (tmp_path / "empty").mkdir()
    assert prepare_fresh_run(tmp_path / "empty", "move_aside") is None
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ExistingRunError, match=r"already holds files that are not from a gfn-jax run "
                       r"\(notes.txt\); a fresh run never mixes with it: pass a new or empty --workdir"):
        prepare_fresh_run(foreign, "move_aside")
    assert snapshot(foreign) == {"notes.txt": b"mine"}
    with pytest.raises(ValueError, match="mode"):
        prepare_fresh_run(foreign, "delete")


# --------------------------------------------------------------------------------------
# config changes on resume
# --------------------------------------------------------------------------------------

OLD = {"seed": 0, "model": {"spec": "tiny", "dtype": "float32"},
       "optim": {"lr": 1e-4, "schedule": "constant"},
       "objective": {"name": "subtb"}, "lora": {"rank": 8, "targets": ("a", "b")},
       "train": {"steps": 100, "log_every": 1, "ckpt_every": 50, "keep_checkpoints": 3},
       "eval": {"num_samples": 1000}, "mesh": {"data": -1}}


def _new(**changes):
    cfg = json.loads(json.dumps(OLD))
    for key, value in changes.items():
        d = cfg
        *parents, last = key.split("__")
        for p in parents:
            d = d[p]
        if value is MISSING:
            del d[last]
        else:
            d[last] = value
    return cfg


def test_config_unchanged_and_harmless():
    # lists and tuples compare equal (JSON round trip)
    assert check_config_change(OLD, json.loads(json.dumps(OLD))).ok
    ch = check_config_change(OLD, _new(train__steps=300, train__log_every=10, eval__num_samples=5,
                                       mesh__data=2))
    assert ch.ok and ch.message() == ""
    assert ch.harmless == [("eval.num_samples", 1000, 5), ("mesh.data", -1, 2),
                           ("train.log_every", 1, 10), ("train.steps", 100, 300)]
    ch.raise_if_refused()


def test_config_meaning_change_refused_unless_allowed():
    new = _new(optim__lr=3e-4, seed=1, objective__name="tb")
    ch = check_config_change(OLD, new)
    assert not ch.ok
    assert ch.refused == [("objective.name", "subtb", "tb"), ("optim.lr", 1e-4, 3e-4), ("seed", 0, 1)]
    with pytest.raises(ConfigChangeError, match=re.escape(
            "the config changes what the run computes (objective.name: 'subtb' -> 'tb', optim.lr: "
            "0.0001 -> 0.0003, seed: 0 -> 1); resuming would mix two runs: use a new --workdir, or "
            "pass --allow_config_change to resume with the change anyway")):
        ch.raise_if_refused()
    # allowed explicitly: all, or by key pattern
    assert check_config_change(OLD, new, allow=True).ok
    part = check_config_change(OLD, new, allow=["optim.*", "seed"])
    assert part.refused == [("objective.name", "subtb", "tb")]
    assert part.allowed == [("optim.lr", 1e-4, 3e-4), ("seed", 0, 1)]
    # a key that is not known to be harmless counts as a meaning change; so does a removed one
    assert check_config_change(OLD, _new(model__dtype="bfloat16")).meaning == [("model.dtype", "float32", "bfloat16")]
    assert check_config_change(OLD, _new(seed=MISSING)).meaning == [("seed", 0, MISSING)]


def test_config_steps_change_with_decaying_schedule_changes_meaning():
    old = _new(optim__schedule="cosine")
    ch = check_config_change(old, dict(old, train=dict(old["train"], steps=200)))
    assert ch.meaning == [("train.steps", 100, 200)]


def test_config_structural_change_needs_new_workdir():
    ch = check_config_change(OLD, _new(lora__rank=16))
    assert ch.structural == [("lora.rank", 8, 16)]
    assert check_config_change(OLD, _new(lora__rank=16), allow=True).structural  # never allowed
    with pytest.raises(ConfigChangeError, match=r"the config changes the shape of the saved state "
                       r"\(lora.rank: 8 -> 16\); the checkpoints cannot be resumed with it: use a new "
                       r"--workdir$"):
        ch.raise_if_refused()
    # a section became a value
    ch = check_config_change(OLD, _new(objective="tb"))
    assert ch.structural == [("objective", {"name": "subtb"}, "tb")]
    assert "use a new --workdir" in ch.message()


# --------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------


def test_atomic_output_dir_replaces_old_export_only_on_success(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"old1")
    (out / "model-00002-of-00002.safetensors").write_bytes(b"old2")
    (out / "model.safetensors.index.json").write_text("old index")
    old = snapshot(out)
    with pytest.raises(OutputPathError, match=rf"--out {out} is not empty \(3 entries, .*\); pass "
                       r"--overwrite to replace it or choose a new directory"):
        with atomic_output_dir(out):
            raise AssertionError("not reached")
    assert snapshot(out) == old
    # a failure half-way leaves the old export as it was and no temporary directory
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(out, overwrite=True) as tmp:
            open(os.path.join(tmp, "model.safetensors"), "wb").write(b"half")
            raise RuntimeError("boom")
    assert snapshot(out) == old and sorted(os.listdir(tmp_path)) == ["export"]
    # success: exactly the new files (the old shard index is gone, so loading cannot pick old weights)
    with atomic_output_dir(out, overwrite=True) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and os.listdir(tmp) == []
        open(os.path.join(tmp, "model.safetensors"), "wb").write(b"new")
        assert snapshot(out) == old  # not replaced before the end
    assert snapshot(out) == {"model.safetensors": b"new"}
    assert sorted(os.listdir(tmp_path)) == ["export"]
    # a new directory
    with atomic_output_dir(tmp_path / "fresh") as tmp:
        open(os.path.join(tmp, "a"), "w").write("a")
    assert snapshot(tmp_path / "fresh") == {"a": b"a"}


def test_output_dir_never_in_or_over_a_run(tmp_path):
    run = tmp_path / "runs" / "toy"
    before = make_run(run)
    for out, pattern in [
        (run, rf"--out {run} is the run directory {run}; writing there would break the run"),
        (run / "export", rf"--out {run}/export is inside the run directory {run}; writing there would break"),
        (run / "checkpoints" / "x", rf"is inside the run directory {run}"),
        (tmp_path / "runs", rf"--out {tmp_path}/runs contains the run directory {run}; choose another"),
    ]:
        with pytest.raises(OutputPathError, match=pattern):
            with atomic_output_dir(out, overwrite=True):
                raise AssertionError("not reached")
    # forbid_inside: the run being exported, even before it has config.json
    other = tmp_path / "young"
    other.mkdir()
    with pytest.raises(OutputPathError, match=r"inside the run directory .*young"):
        check_output_dir(other / "out", forbid_inside=[other])
    assert snapshot(run) == before
    assert sorted(os.listdir(tmp_path)) == ["runs", "young"]


def test_atomic_write_file(tmp_path):
    p = tmp_path / "samples.jsonl"
    p.write_text("old\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write_file(p) as f:
            f.write("partial\n")
            raise KeyboardInterrupt
    assert p.read_text() == "old\n" and os.listdir(tmp_path) == ["samples.jsonl"]
    with atomic_write_file(p) as f:
        f.write("new\n")
        assert p.read_text() == "old\n"
    assert p.read_text() == "new\n" and os.listdir(tmp_path) == ["samples.jsonl"]
    assert oct(os.stat(p).st_mode & 0o777) != oct(0o600)  # normal permissions, not mkstemp's
    with atomic_write_file(tmp_path / "b.bin", "wb") as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"


def test_check_writable_fails_early(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputPathError, match=r"^.*while checking that --output can be written.*afile"):
        check_writable(tmp_path / "afile" / "samples.jsonl", flag="--output")
    assert (tmp_path / "afile").read_text() == "x"
    with pytest.raises(OutputPathError, match=r"--output .* is a directory; give a file path"):
        check_writable(tmp_path, flag="--output")
    # creates a missing directory, leaves no probe behind
    assert check_writable(tmp_path / "new" / "s.jsonl") == str(tmp_path / "new" / "s.jsonl")
    assert os.listdir(tmp_path / "new") == []

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "ro"))

    monkeypatch.setattr(rundir.tempfile, "mkstemp", denied)
    with pytest.raises(OutputPathError, match=r"^permission denied while checking that --output can be "
                       r"written to .*ro; fix the permissions or point --output elsewhere$"):
        check_writable(tmp_path / "ro" / "s.jsonl", flag="--output")


def test_check_writable_free_space(tmp_path):
    with pytest.raises(OutputPathError, match=r"only \d+ MiB free in .* for --out \(needs about \d+ MiB\); "
                       r"free space or point --out elsewhere"):
        check_writable(tmp_path / "x", flag="--out", min_free_bytes=1 << 62)


# --------------------------------------------------------------------------------------
# one-line OS errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("code, expected", [
    (errno.ENOSPC, "disk full while saving checkpoint to /r/ck; free space or point --workdir elsewhere"),
    (errno.EACCES, "permission denied while saving checkpoint to /r/ck; fix the permissions or point "
                   "--workdir elsewhere"),
    (errno.EROFS, "read-only file system while saving checkpoint to /r/ck; point --workdir elsewhere "
                  "(a writable location)"),
    (errno.ENOENT, "no such file or directory while saving checkpoint: /r/ck; check the path"),
])
def test_one_line_os_error(code, expected):
    e = OSError(code, os.strerror(code), "/r/ck")
    assert one_line_os_error(e, "saving checkpoint", flag="--workdir") == expected


def test_find_os_error_in_chains_and_messages():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as e:
        assert find_os_error(e).errno == errno.ENOSPC
    # tensorstore/orbax errors carry it only in the text
    text = ValueError('Error writing local file "/x/manifest.ocdbt": No space left on device [os_error_code=28]')
    assert find_os_error(text).errno == errno.ENOSPC
    assert one_line_os_error(text, "saving checkpoint", "/x", "--workdir").startswith("disk full while")
    assert find_os_error(ValueError("shape mismatch")) is None
    msg = one_line_os_error(ValueError("bad\nthing"), "reading x")
    assert "\n" not in msg and msg == "ValueError while reading x: bad thing"
