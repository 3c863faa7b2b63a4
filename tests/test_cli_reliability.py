"""Issue 9, end to end through the CLI: run directories never lose or mix data, every expected
error is a short actionable message, and the command line explains itself.

Each test asserts both the message (short, no traceback, naming the key / file / flag) and
that no data was lost or mixed (file bytes, metrics, checkpoint steps). One small toy run is
trained once per module and copied where a test changes it; a persistent XLA compilation
cache (a temporary directory, reset afterwards) keeps the repeated tiny trainings fast.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from gfn_jax import cli
from gfn_jax.checkpoint import Checkpointer
from gfn_jax.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "configs", "toy_exact.py")
FAST = ["--config.train.steps=2", "--config.eval.num_samples=0",
        "--config.optim.schedule=constant", "--config.train.ckpt_every=1", "--noprogress"]


# --------------------------------------------------------------------------------------
# helpers and fixtures
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """A persistent compilation cache for this module only (restored afterwards)."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    d = str(tmp_path_factory.mktemp("xla-cache"))
    jax.config.update("jax_compilation_cache_dir", d)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    cc.reset_cache()
    yield d
    for n, v in old.items():
        jax.config.update(n, v)
    cc.reset_cache()


def gfn(capsys, *argv):
    """``gfn-jax ARGV`` in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = cli.main(["gfn-jax", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def train_args(workdir, *extra):
    return ["train", "--config", TOY, "--workdir", workdir, *FAST, *extra]


def assert_short_error(err, *needles, max_lines=3):
    assert "Traceback" not in err, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert 1 <= len(lines) <= max_lines, err
    for n in needles:
        assert str(n) in err, (n, err)


def snapshot(root, skip=("gfn-jax.lock",)):
    """{relative path: sha256} of every file under ``root``."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name in skip:
                continue
            p = os.path.join(dirpath, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def ckpt_steps(workdir):
    return Checkpointer(os.path.join(workdir, "checkpoints")).all_steps()


def metric_steps(workdir):
    return [r["step"] for r in read_metrics(workdir)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, compile_cache):
    """A finished 2-step toy run (checkpoints at steps 1 and 2); never modified by tests."""
    wd = str(tmp_path_factory.mktemp("trained") / "run")
    assert cli.main(["gfn-jax", *train_args(wd)]) == 0
    assert ckpt_steps(wd) == [1, 2]
    return wd


@pytest.fixture
def run_copy(trained, tmp_path):
    wd = str(tmp_path / "run")
    shutil.copytree(trained, wd)
    return wd


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is loaded (validation must come first)."""
    calls = []

    def boom(*a, **k):
        calls.append(a)
        raise AssertionError("a model was loaded before the bad input was rejected")

    monkeypatch.setattr("gfn_jax.train.load_model_config", boom)  # the trainer's first read
    monkeypatch.setattr("gfn_jax.train.load_base_params", boom)
    monkeypatch.setattr("gfn_jax.cli._load_run", boom)
    return calls


def subprocess_env(cache_dir):
    return dict(os.environ, PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=cache_dir,
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


# --------------------------------------------------------------------------------------
# the command line explains itself
# --------------------------------------------------------------------------------------
HELP_FLAGS = {
    "train": ("config", "workdir", "resume", "progress", "move_aside", "allow_config_change",
              "force_unlock", "debug"),
    "sample": ("workdir", "num", "output", "temperature", "prompt", "seed", "batch_size",
               "debug"),
    "eval": ("workdir", "num", "seed", "debug"),
    "convert": ("model", "workdir", "out", "overwrite", "debug"),
}


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("cmd", sorted(HELP_FLAGS))
def test_every_subcommand_help_lists_its_flags_with_meanings(cmd, flag, capsys, tmp_path):
    wd = tmp_path / "never"
    rc, out, err = gfn(capsys, cmd, "--workdir", wd, flag)
    assert rc == 0 and err == "" and "Unknown command line flag" not in out
    assert out.startswith(f"usage: gfn-jax {cmd}")
    for name in HELP_FLAGS[cmd]:
        line = [l for l in out.splitlines() if l.strip().startswith((f"--{name}:",
                                                                      f"--[no]{name}:"))]
        assert len(line) == 1, (name, out)
        meaning = line[0].split(":", 1)[1].strip()
        assert len(meaning) > 10, line  # a meaning, not just the name
    assert "temperature" not in out or cmd == "sample"
    assert not wd.exists()  # --help does nothing else


def test_sweep_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["gfn-jax", "sweep", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for sub in ("expand", "run", "emit", "summary", "status"):
        assert sub in out


@pytest.mark.parametrize("argv", [[], ["--help"], ["-h"]])
def test_top_level_help_lists_subcommands(argv, capsys):
    rc, out, _ = gfn(capsys, *argv)
    assert rc == 0
    for cmd in ("train", "sample", "eval", "convert", "sweep"):
        line = [l for l in out.splitlines() if l.strip().startswith(cmd + " ")]
        assert line and len(line[0].split(None, 1)[1]) > 10, (cmd, out)


def test_unknown_command_and_unknown_config_key(capsys, tmp_path):
    rc, _, err = gfn(capsys, "trian")
    assert rc == 2 and "unknown command 'trian'" in err and "Traceback" not in err
    rc, _, err = gfn(capsys, "train", "--config", TOY, "--workdir", tmp_path / "w",
                     "--config.train.stepz=2")
    assert rc == 2
    assert err.strip() == "error: unknown config key train.stepz (did you mean train.steps?)"
    assert not (tmp_path / "w").exists()


# --------------------------------------------------------------------------------------
# data is never lost or mixed
# --------------------------------------------------------------------------------------
def test_noresume_on_a_used_dir_is_refused_then_moved_aside_whole(run_copy, capsys):
    before = snapshot(run_copy)
    rc, _, err = gfn(capsys, *train_args(run_copy, "--noresume"))
    assert rc == 1
    assert_short_error(err, run_copy, "already holds a run", "--move_aside", "steps [1, 2]")
    assert snapshot(run_copy) == before  # nothing deleted, nothing written

    rc, out, err = gfn(capsys, *train_args(run_copy, "--noresume", "--move_aside",
                                           "--config.seed=7"))
    assert rc == 0, err
    moved = [l.split("moved the previous run to ", 1)[1].strip() for l in out.splitlines()
             if "moved the previous run to " in l]
    assert len(moved) == 1 and moved[0].startswith(run_copy + ".old-")
    # the old run moved whole and unchanged (its lock file not left behind) ...
    assert snapshot(moved[0]) == before
    assert not os.path.exists(os.path.join(moved[0], "gfn-jax.lock"))
    # ... and the new run is clean: its own config, checkpoints and metrics only
    assert json.load(open(os.path.join(run_copy, "config.json")))["seed"] == 7
    assert ckpt_steps(run_copy) == [1, 2]
    _, meta, _ = Checkpointer(os.path.join(run_copy, "checkpoints")).restore()
    assert meta["config"]["seed"] == 7
    assert metric_steps(run_copy) == [0, 1]
    old_times = [r["time"] for r in read_metrics(moved[0])]
    assert min(r["time"] for r in read_metrics(run_copy)) > max(old_times)


def test_resume_with_a_meaning_change_is_refused_unless_allowed(run_copy, capsys):
    before = snapshot(run_copy)
    args = train_args(run_copy, "--config.train.steps=3", "--config.optim.lr=0.01")
    rc, out, err = gfn(capsys, *args)
    assert rc == 1
    assert_short_error(err, "optim.lr: 0.003 -> 0.01", "--allow_config_change",
                       "new --workdir")
    assert "resuming" not in out
    assert snapshot(run_copy) == before

    rc, out, err = gfn(capsys, *args, "--allow_config_change")
    assert rc == 0, err
    assert "resuming from step 2 of 3" in out
    assert ckpt_steps(run_copy) == [1, 2, 3]
    assert metric_steps(run_copy) == [0, 1, 2]
    assert json.load(open(os.path.join(run_copy, "config.json")))["optim"]["lr"] == 0.01


def test_resume_with_a_structural_change_needs_a_new_workdir(run_copy, capsys):
    before = snapshot(run_copy)
    rc, out, err = gfn(capsys, *train_args(run_copy, "--config.model.random.d_model=32",
                                           "--allow_config_change"))
    assert rc == 1
    assert_short_error(err, "model.random.d_model: 64 -> 32", "use a new --workdir")
    assert snapshot(run_copy) == before


def test_harmless_change_resumes_and_says_from_which_step(run_copy, capsys):
    rc, out, err = gfn(capsys, *train_args(run_copy, "--config.train.steps=3"))
    assert rc == 0, err
    assert "resuming from step 2 of 3" in out
    assert ckpt_steps(run_copy) == [1, 2, 3] and metric_steps(run_copy) == [0, 1, 2]


def test_second_train_on_a_locked_run_dir_names_the_holder(run_copy, capsys, compile_cache):
    before = snapshot(run_copy)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from gfn_jax.rundir import RunLock; "
         "lock = RunLock(sys.argv[1], command='gfn-jax train (the first one)'); "
         "lock.acquire(); print('locked', flush=True); time.sleep(600)", run_copy],
        env=subprocess_env(compile_cache), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        lock_bytes = open(os.path.join(run_copy, "gfn-jax.lock"), "rb").read()
        rc, out, err = gfn(capsys, *train_args(run_copy, "--config.train.steps=3"))
        assert rc == 1
        assert_short_error(err, f"is locked by pid {holder.pid} on host",
                           "gfn-jax train (the first one)", "--force_unlock")
        assert "resuming" not in out
        # nothing written: the run and the holder's lock file are as they were
        assert snapshot(run_copy) == before
        assert open(os.path.join(run_copy, "gfn-jax.lock"), "rb").read() == lock_bytes
    finally:
        holder.kill()
        holder.wait()


def _truncate_largest_file(step_dir):
    files = [p for p in glob.glob(os.path.join(step_dir, "**", "*"), recursive=True)
             if os.path.isfile(p) and not p.endswith("gfn_manifest.json")]
    big = max(files, key=os.path.getsize)
    data = open(big, "rb").read()
    with open(big, "wb") as f:
        f.write(data[: len(data) // 2])
    return os.path.relpath(big, step_dir), data[: len(data) // 2]


def test_corrupt_latest_checkpoint_falls_back_and_is_kept_aside(run_copy, capsys):
    ck_dir = os.path.join(run_copy, "checkpoints")
    rel, truncated = _truncate_largest_file(os.path.join(ck_dir, "2"))
    step1 = snapshot(os.path.join(ck_dir, "1"))
    rc, out, err = gfn(capsys, *train_args(run_copy))
    assert rc == 0, err
    warn = [l for l in out.splitlines() if l.startswith("warning: checkpoint step 2 is corrupt")]
    assert len(warn) == 1, out
    assert rel in warn[0] and "truncated" in warn[0]
    assert "resuming from step 1, the newest intact checkpoint" in warn[0]
    assert "resuming from step 1 of 2" in out
    # the corrupt checkpoint is kept, byte for byte, for inspection ...
    aside = glob.glob(os.path.join(ck_dir, "corrupt-2-*"))
    assert len(aside) == 1 and aside[0] in warn[0]
    assert open(os.path.join(aside[0], rel), "rb").read() == truncated
    # ... the intact one was not touched, and step 2 was trained again and saved intact
    assert snapshot(os.path.join(ck_dir, "1")) == step1
    ck = Checkpointer(ck_dir)
    assert ck.all_steps() == [1, 2]
    _, meta, _ = ck.restore()
    assert meta["step"] == 2 and ck.last_fallback is None
    assert metric_steps(run_copy) == [0, 1]


def test_convert_never_writes_into_a_run_directory(trained, capsys, tmp_path):
    before = snapshot(trained)
    for out_dir in (trained, os.path.join(trained, "export")):
        rc, _, err = gfn(capsys, "convert", "--workdir", trained, "--out", out_dir,
                         "--overwrite")
        assert rc == 1
        assert_short_error(err, "--out", "run directory", "would break the run")
    assert snapshot(trained) == before
    assert not os.path.exists(os.path.join(trained, "export"))


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_convert_over_an_old_sharded_export(trained, capsys, tmp_path):
    from safetensors.numpy import load_file, save_file

    from gfn_jax.models import hf
    from gfn_jax.policy import load_run

    fresh = str(tmp_path / "fresh")
    rc, _, err = gfn(capsys, "convert", "--workdir", trained, "--out", fresh)
    assert rc == 0, err
    # an older export of other weights, sharded: an index and two shards, no model.safetensors
    old = str(tmp_path / "export")
    os.makedirs(old)
    for name in os.listdir(fresh):
        if name != "model.safetensors":
            shutil.copy(os.path.join(fresh, name), old)
    tensors = {k: v + 1.0 for k, v in load_file(os.path.join(fresh, "model.safetensors")).items()}
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, os.path.join(old, shard))
    with open(os.path.join(old, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}, f)
    old_params = hf.load_hf(old)[1]
    before = snapshot(old)

    rc, _, err = gfn(capsys, "convert", "--workdir", trained, "--out", old)
    assert rc == 1
    assert_short_error(err, "--out", "is not empty", "--overwrite")
    assert snapshot(old) == before

    rc, out, err = gfn(capsys, "convert", "--workdir", trained, "--out", old, "--overwrite")
    assert rc == 0, err
    assert sorted(os.listdir(old)) == sorted(os.listdir(fresh))  # no stale index or shard
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".export")]  # no temp dirs
    new_params = hf.load_hf(old)[1]
    run_params = load_run(trained)[2].merged_params()
    for a, b, c in zip(_leaves(new_params), _leaves(run_params), _leaves(old_params)):
        np.testing.assert_array_equal(a, b)  # the run's (new) weights ...
        assert not np.array_equal(a, c)  # ... not the old export's


def test_unwritable_sample_output_fails_before_sampling(trained, capsys, tmp_path,
                                                       monkeypatch):
    loaded = []
    monkeypatch.setattr("gfn_jax.cli._load_run", lambda *a: loaded.append(a) or 1 / 0)
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory\n")
    listing = sorted(os.listdir(tmp_path))
    for bad, why in ((blocker / "sub" / "s.jsonl", "not a directory while checking that "
                      f"--output can be written: {blocker}"),
                     (tmp_path, f"--output {tmp_path} is a directory; give a file path")):
        rc, _, err = gfn(capsys, "sample", "--workdir", trained, "--num", 20000, "--output", bad)
        assert rc == 1
        assert_short_error(err.lower(), why.lower())
    assert loaded == []  # no model loaded, nothing drawn
    assert sorted(os.listdir(tmp_path)) == listing
    assert blocker.read_text() == "not a directory\n"


def test_sample_writes_its_output_atomically(trained, capsys, tmp_path):
    out_file = tmp_path / "s.jsonl"
    out_file.write_text("old\n")
    rc, out, err = gfn(capsys, "sample", "--workdir", trained, "--num", 8, "--output", out_file,
                       "--seed", 3)
    assert rc == 0, err
    rows = [json.loads(l) for l in out_file.read_text().splitlines()]
    assert len(rows) == 8 and {"prompt", "text", "log_q"} <= set(rows[0])
    assert sorted(os.listdir(tmp_path)) == ["s.jsonl"]  # no temporary file left


def test_sigint_saves_exits_3_and_the_resumed_summary_keeps_before(tmp_path, capsys,
                                                                   compile_cache):
    wd = str(tmp_path / "run")
    base = ["--config", TOY, "--workdir", wd, "--noprogress", "--config.optim.schedule=constant",
            "--config.train.ckpt_every=0", "--config.eval.num_samples=64",
            "--config.eval.batch_size=64", "--config.train.log_every=1"]
    proc = subprocess.Popen([sys.executable, "-m", "gfn_jax.cli", "train", *base,
                             "--config.train.steps=100000"],
                            env=subprocess_env(compile_cache), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    metrics = os.path.join(wd, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and len(read_metrics(metrics)) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read().decode()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    out = out.decode()
    assert proc.returncode == cli.EXIT_PREEMPTED, out
    assert "Traceback" not in out
    assert "evaluating the base model" not in out  # --noprogress: no bars
    step = Checkpointer(os.path.join(wd, "checkpoints")).latest_step()
    assert step is not None and step >= 2
    assert f"preempted at step {step}: checkpoint saved" in out
    summary = json.load(open(os.path.join(wd, "summary.json")))
    assert summary["preempted_at"] == step and summary["complete"] is False
    assert list(summary["eval"]) == ["before"]  # no evaluation after a preemption
    usage = summary["host_usage"]  # this process's CPU time and page faults per phase
    assert sorted(usage) == ["eval_before", "training", "whole_process"]
    for phase in ("eval_before", "training"):
        assert usage[phase]["user_cpu_s"] > 0 and usage[phase]["minor_faults"] >= 0
        assert usage[phase]["user_cpu_s"] < usage["whole_process"]["user_cpu_s"]
    assert not os.path.exists(os.path.join(wd, "eval_after.json"))
    assert not os.path.exists(os.path.join(wd, "DONE"))
    before = summary["eval"]["before"]
    assert before == json.load(open(os.path.join(wd, "eval_before.json")))

    rc, out, err = gfn(capsys, "train", *base, f"--config.train.steps={step + 1}")
    assert rc == 0, err
    assert f"resuming from step {step} of {step + 1}" in out
    assert "eval (before)" not in out  # not evaluated again
    summary = json.load(open(os.path.join(wd, "summary.json")))
    assert summary["complete"] is True and "preempted_at" not in summary
    assert summary["eval"]["before"] == before and "after" in summary["eval"]
    assert sorted(summary["host_usage"]) == ["eval_after", "training", "whole_process"]
    assert metric_steps(wd) == list(range(step + 1))
    assert os.path.exists(os.path.join(wd, "DONE"))
    # metrics.png was redrawn after the final evaluation (its point is on the figure)
    assert os.path.getmtime(os.path.join(wd, "metrics.png")) >= \
        os.path.getmtime(os.path.join(wd, "eval_after.json"))


def test_progress_bars_say_which_phase_they_are(tmp_path, capsys):
    wd = str(tmp_path / "run")
    rc, out, err = gfn(capsys, "train", "--config", TOY, "--workdir", wd,
                       "--config.train.steps=2", "--config.optim.schedule=constant",
                       "--config.eval.num_samples=64", "--config.eval.batch_size=16")
    assert rc == 0, err
    # tqdm draws on stderr: one labelled bar per phase, in order
    phases = ["evaluating the base model", "training", "evaluating the tuned policy"]
    at = [err.find(p + ":") for p in phases]
    assert all(i >= 0 for i in at) and at == sorted(at), err[-2000:]
    assert "sampling:" not in err


def test_rerunning_a_finished_train_says_complete_and_keeps_everything(run_copy, capsys):
    before = snapshot(run_copy)
    summary = open(os.path.join(run_copy, "summary.json"), "rb").read()
    assert json.loads(summary)["complete"] is True
    rc, out, err = gfn(capsys, *train_args(run_copy))
    assert rc == 0, err
    assert f"the run in {run_copy} is already complete at step 2 (summary.json kept)" in out
    assert "resuming" not in out
    assert open(os.path.join(run_copy, "summary.json"), "rb").read() == summary
    assert snapshot(run_copy) == before


def test_clean_run_logs_no_overwrite_warning(tmp_path, capsys, caplog):
    wd = str(tmp_path / "run")
    with caplog.at_level(logging.WARNING):
        rc, out, err = gfn(capsys, *train_args(wd))
    assert rc == 0, err
    text = out + err + "\n".join(r.getMessage() for r in caplog.records)
    assert "already exists" not in text and "not overwriting" not in text
    assert ckpt_steps(wd) == [1, 2]
    # the capture works: saving step 2 again is exactly what that warning reports
    ck = Checkpointer(os.path.join(wd, "checkpoints"))
    state, _, _ = ck.restore()
    with caplog.at_level(logging.WARNING):
        assert ck.save(2, state) is False
    assert any("already exists" in r.getMessage() for r in caplog.records)


def test_disk_full_while_saving_is_one_line_and_keeps_checkpoints(run_copy, capsys,
                                                                  monkeypatch):
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "somefile")

    before = snapshot(os.path.join(run_copy, "checkpoints"))
    monkeypatch.setattr("gfn_jax.checkpoint._atomic_write_text", full)
    rc, out, err = gfn(capsys, *train_args(run_copy, "--config.train.steps=3"))
    assert rc == 1
    ck_dir = os.path.join(run_copy, "checkpoints")
    assert_short_error(err, f"disk full while saving checkpoint step 3 to {ck_dir}",
                       "the previous checkpoints are intact (latest: step 2)")
    assert snapshot(ck_dir) == before and ckpt_steps(run_copy) == [1, 2]


# --------------------------------------------------------------------------------------
# every error is short and actionable
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,message", [
    ("train.steps=-1", "train.steps must be >= 0, got -1"),
    ("train.samples_per_prompt=0", "train.samples_per_prompt must be >= 1, got 0"),
    ("train.log_every=0", "train.log_every must be >= 1, got 0"),
    ("optim.lr=-1", "optim.lr must be a finite number >= 0, got -1"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints must be >= 1, got 0"),
    ("task.max_len=0", "task.max_len must be >= 1, got 0"),
])
def test_bad_config_values_are_rejected_before_any_model(override, message, tmp_path, capsys,
                                                         no_model):
    wd = tmp_path / "run"
    rc, out, err = gfn(capsys, *train_args(wd, f"--config.{override}"))
    assert rc == 1
    assert_short_error(err, message)
    assert no_model == []
    assert not wd.exists() or os.listdir(wd) == []  # no run files written


@pytest.mark.parametrize("argv,message", [
    (["eval", "--num", "-5"], "--num must be > 0"),
    (["sample", "--num", "0"], "--num must be > 0, got 0"),
])
def test_bad_num_is_rejected_before_any_model(argv, message, trained, tmp_path, capsys,
                                              no_model):
    before = snapshot(trained)
    out_file = tmp_path / "s.jsonl"
    extra = ["--output", out_file] if argv[0] == "sample" else []
    rc, _, err = gfn(capsys, argv[0], "--workdir", trained, *argv[1:], *extra)
    assert rc == 2
    assert_short_error(err, message)
    assert no_model == []
    assert snapshot(trained) == before and not out_file.exists()


def test_debug_shows_the_traceback(run_copy, capsys, monkeypatch):
    from gfn_jax.rundir import ExistingRunError

    with pytest.raises(ExistingRunError):
        cli.main(["gfn-jax", *train_args(run_copy, "--noresume", "--debug")])
    monkeypatch.setenv("GFN_JAX_DEBUG", "1")
    with pytest.raises(ExistingRunError):
        cli.main(["gfn-jax", *train_args(run_copy, "--noresume")])
    monkeypatch.delenv("GFN_JAX_DEBUG")
    rc, _, err = gfn(capsys, *train_args(run_copy, "--noresume"))
    assert rc == 1 and "--debug or GFN_JAX_DEBUG=1" in err


GOOD = {"text": "a fine film", "label_text": "subjective"}


@pytest.mark.parametrize("lines,line_no,message", [
    ([json.dumps(GOOD), json.dumps(GOOD), "{oops"], 3, "not valid JSON"),
    ([json.dumps(GOOD), json.dumps({"text": None, "label_text": "objective"})], 2,
     "field 'text' is null"),
    ([json.dumps(GOOD), json.dumps({"text": "  ", "label_text": "objective"})], 2,
     "field 'text' is empty"),
    ([json.dumps(GOOD).encode(), b'{"text": "caf\xe9", "label_text": "objective"}'], 2,
     "not UTF-8 text (byte 0xe9"),
])
def test_bad_infill_rows_name_file_and_line(lines, line_no, message, tmp_path, capsys,
                                            no_model):
    data = tmp_path / "rows.jsonl"
    data.write_bytes(b"\n".join(l if isinstance(l, bytes) else l.encode() for l in lines)
                     + b"\n")
    wd = tmp_path / "run"
    rc, _, err = gfn(capsys, "train", "--config", os.path.join(ROOT, "configs/infill_subj.py"),
                     "--workdir", wd, f"--config.task.data_path={data}")
    assert rc == 1
    assert_short_error(err, f"{data}:{line_no}: {message}")
    assert no_model == [] and (not wd.exists() or os.listdir(wd) == [])


def test_infill_row_missing_the_templates_field(tmp_path, capsys, no_model):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + json.dumps({"label_text": "objective"}) + "\n")
    wd = tmp_path / "run"
    rc, _, err = gfn(capsys, "train", "--config", os.path.join(ROOT, "configs/infill_subj.py"),
                     "--workdir", wd, f"--config.task.data_path={data}")
    assert rc == 1
    assert_short_error(err, f"{data}:2", "missing field(s) 'text'")
    assert no_model == [] and (not wd.exists() or os.listdir(wd) == [])
    # the reader itself names the line when told the fields a template needs
    from gfn_jax.tasks.infill import read_jsonl

    with pytest.raises(ValueError, match=rf"^{data}:2: missing field\(s\) 'text'"):
        read_jsonl(str(data), required=("text", "label_text"))
    assert read_jsonl(str(data), skip_bad=True, required=("text",)) == [GOOD]


def test_continuation_prompts_not_utf8_name_file_and_line(tmp_path, capsys, no_model):
    data = tmp_path / "prompts.txt"
    data.write_bytes(b"The cat sat on the mat.\n\nA \xff\xfe line.\n")
    wd = tmp_path / "run"
    rc, _, err = gfn(capsys, "train", "--config", os.path.join(ROOT, "configs/continuation.py"),
                     "--workdir", wd, f"--config.task.data_path={data}")
    assert rc == 1
    assert_short_error(err, f"{data}:3: not UTF-8 text (byte 0xff")
    assert no_model == [] and (not wd.exists() or os.listdir(wd) == [])


def test_non_finite_step_reports_the_checkpoint_on_disk(run_copy, capsys):
    ck_before = snapshot(os.path.join(run_copy, "checkpoints"))
    rc, out, err = gfn(capsys, *train_args(run_copy, "--config.train.steps=5",
                                           "--config.task.w_a=nan", "--allow_config_change"))
    assert rc == 1
    assert "resuming from step 2 of 5" in out
    assert_short_error(err, "non-finite loss", "at step 2",
                       "the last checkpoint on disk (step 2) is clean")
    assert "step None" not in err
    assert snapshot(os.path.join(run_copy, "checkpoints")) == ck_before
