"""gfn_jax.sweep: grid expansion, run names, launch commands, run status, summaries, and a real
2-point sweep of the toy task run locally through ``python -m gfn_jax.sweep``."""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys

import pytest

from gfn_jax import sweep as sw
from tiny import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "configs", "sweeps", "continuation_temperature.py")


def _sweep(**kw):
    d = {"config": "configs/toy_exact.py",
         "grid": {"reward.temp_end": [0.8, 0.9], "train.steps": [100, 200]},
         "fixed": {"eval.num_samples": 0}}
    d.update(kw)
    return sw.Sweep.from_dict(d, default_name="t")


def test_expand_names_workdirs_and_overrides():
    runs = sw.expand(_sweep(), root="out/sw")
    assert [r.name for r in runs] == ["temp_end-0.8_steps-100", "temp_end-0.8_steps-200",
                                      "temp_end-0.9_steps-100", "temp_end-0.9_steps-200"]
    assert [r.workdir for r in runs] == [os.path.join("out/sw", r.name) for r in runs]
    assert runs[1].values == {"reward.temp_end": 0.8, "train.steps": 200}
    assert runs[1].overrides == {"eval.num_samples": 0, "reward.temp_end": 0.8,
                                 "train.steps": 200}
    assert sw.override_args(runs[1].overrides) == [
        "--config.eval.num_samples=0", "--config.reward.temp_end=0.8", "--config.train.steps=200"]
    # gs:// roots are joined with "/"
    assert sw.expand(_sweep(), root="gs://b/x/")[0].workdir == "gs://b/x/temp_end-0.8_steps-100"
    # default root: the spec's, else runs/sweeps/NAME
    assert sw.expand(_sweep())[0].workdir == os.path.join("runs", "sweeps", "t",
                                                          "temp_end-0.8_steps-100")
    assert sw.expand(_sweep(root="r"))[0].workdir == os.path.join("r", "temp_end-0.8_steps-100")


def test_names_are_filesystem_safe_and_unique():
    s = _sweep(grid={"a.lr": [1e-4, 0.5], "b.lr": [1]}, fixed={})
    assert [r.name for r in sw.expand(s, "x")] == ["a.lr-0.0001_b.lr-1", "a.lr-0.5_b.lr-1"]
    s = _sweep(grid={"task.data_path": ["d/p q.txt", "d_p_q.txt", "../x"],
                     "lora.targets": [["q", "v"]], "lora.enabled": [True]}, fixed={})
    names = [r.name for r in sw.expand(s, "x")]
    assert len(set(names)) == 3
    for n in names:
        assert "/" not in n and " " not in n and not n.startswith((".", "-"))
        assert all(c.isalnum() or c in "._+=-" for c in n), n
    assert names[0].startswith("data_path-d_p_q.txt_targets-q+v_enabled-true-")  # collided
    assert names[1].startswith("data_path-d_p_q.txt_targets-q+v_enabled-true-")
    assert names[0] != names[1]
    assert names[2] == "data_path-.._x_targets-q+v_enabled-true"
    long = sw.expand(_sweep(grid={"task.prompt_prefix": ["y" * 300]}, fixed={}), "x")[0].name
    assert len(long) <= 120


def test_spec_validation():
    with pytest.raises(ValueError, match="non-empty 'grid'"):
        sw.Sweep.from_dict({"config": "c.py", "grid": {}})
    with pytest.raises(ValueError, match="both fixed and swept"):
        sw.Sweep.from_dict({"config": "c.py", "grid": {"a.b": [1]}, "fixed": {"config.a.b": 2}})
    with pytest.raises(ValueError, match="repeats a value"):
        sw.Sweep.from_dict({"config": "c.py", "grid": {"a.b": [1, 1]}})
    with pytest.raises(ValueError, match="non-empty list"):
        sw.Sweep.from_dict({"config": "c.py", "grid": {"a.b": "12"}})
    with pytest.raises(ValueError, match="unknown sweep spec keys"):
        sw.Sweep.from_dict({"config": "c.py", "grid": {"a.b": [1]}, "grdi": {}})
    with pytest.raises(ValueError, match="bad config key"):
        sw.Sweep.from_dict({"config": "c.py", "grid": {"a b": [1]}})
    # --config.x and config.x prefixes are accepted
    assert list(sw.Sweep.from_dict({"config": "c", "grid": {"--config.a.b": [1]}}).grid) == ["a.b"]


def test_check_keys_against_the_base_config(monkeypatch):
    monkeypatch.chdir(REPO)
    sw.check_keys(_sweep())
    with pytest.raises(ValueError, match="'reward.temp_ned' is not a key of configs/toy_exact.py"):
        sw.check_keys(_sweep(grid={"reward.temp_ned": [1.0]}))
    with pytest.raises(FileNotFoundError, match="base config not found"):
        sw.check_keys(_sweep(config="configs/nope.py"))


def test_example_continuation_sweep(monkeypatch):
    monkeypatch.chdir(REPO)
    s = sw.load_sweep(EXAMPLE)
    sw.check_keys(s)
    assert s.config == "configs/continuation.py" and list(s.grid) == ["reward.temp_end"]
    runs = sw.expand(s)
    assert [r.values["reward.temp_end"] for r in runs] == [0.8, 0.85, 0.9, 0.95]
    assert [r.name for r in runs] == ["temp_end-0.8", "temp_end-0.85", "temp_end-0.9",
                                      "temp_end-0.95"]


def test_json_spec_and_emitted_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"config": "configs/toy_exact.py",
                                "grid": {"reward.temp_end": [0.5, 0.8]},
                                "fixed": {"train.steps": 10, "lora.enabled": False}}))
    assert sw.main(["emit", str(spec), "--root", "gs://bkt/s", "--launcher", "tpu",
                    "--launcher-args", "--tpu gfn-{index} --zone us-central2-b"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [shlex.split(x) for x in lines] == [
        ["launch/tpu.sh", "--tpu", f"gfn-{i}", "--zone", "us-central2-b", "--",
         "--config", "configs/toy_exact.py", "--workdir", f"gs://bkt/s/temp_end-{t}",
         "--config.train.steps=10", "--config.lora.enabled=false", f"--config.reward.temp_end={t}"]
        for i, t in enumerate(("0.5", "0.8"))]
    assert sw.main(["emit", str(spec), "--root", "runs/s", "--launcher", "slurm",
                    "--launcher-args", "--nodes=1 --comment='sweep {name}'"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert shlex.split(lines[1]) == [
        "sbatch", "--job-name=s-temp_end-0.8", "--nodes=1", "--comment=sweep temp_end-0.8",
        "launch/slurm.sh", "--config", "configs/toy_exact.py", "--workdir",
        "runs/s/temp_end-0.8", "--config.train.steps=10", "--config.lora.enabled=false",
        "--config.reward.temp_end=0.8"]
    # run --dry-run prints the local commands and creates nothing
    assert sw.main(["run", str(spec), "--root", str(tmp_path / "dry"), "--dry-run",
                    "--", "--config.seed=3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and not (tmp_path / "dry").exists()
    argv = shlex.split(lines[0])
    assert argv[:5] == [sys.executable, "-m", "gfn_jax.cli", "train", "--noprogress"]
    assert argv[-2:] == ["--config.reward.temp_end=0.5", "--config.seed=3"]
    # expand and a bad key
    assert sw.main(["expand", str(spec), "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == ["temp_end-0.5",
                                                                        "temp_end-0.8"]
    spec.write_text(json.dumps({"config": "configs/toy_exact.py", "grid": {"train.stpes": [1]}}))
    assert sw.main(["expand", str(spec)]) == 2
    assert "'train.stpes' is not a key" in capsys.readouterr().err


def test_format_value():
    assert sw.format_value(True) == "true" and sw.format_value(0.1) == "0.1"
    assert sw.format_value(3) == "3" and sw.format_value("a b") == "a b"
    assert sw.format_value(["q", "v"]) == "('q', 'v')" and sw.format_value(None) == "None"


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def test_run_status(tmp_path):
    wd = str(tmp_path / "r")
    assert sw.run_status(wd) == "missing"
    _write(os.path.join(wd, "config.json"), {"train": {"steps": 5}})
    assert sw.run_status(wd) == "incomplete"
    _write(os.path.join(wd, "summary.json"), {"steps": 5})  # trainer's, before evaluation
    assert sw.run_status(wd) == "incomplete"
    _write(os.path.join(wd, "summary.json"), {"steps": 3, "preempted_at": 3, "eval": {}})
    assert sw.run_status(wd) == "incomplete"
    _write(os.path.join(wd, "summary.json"), {"steps": 4, "eval": {}})
    assert sw.run_status(wd) == "incomplete"
    _write(os.path.join(wd, "summary.json"), {"steps": 5, "eval": {}})
    assert sw.run_status(wd) == "done"
    # the CLI's "complete" flag decides when present
    _write(os.path.join(wd, "summary.json"), {"steps": 5, "eval": {}, "complete": False})
    assert sw.run_status(wd) == "incomplete"
    _write(os.path.join(wd, "summary.json"), {"steps": 5, "complete": True})
    assert sw.run_status(wd) == "done"
    assert sw.main(["status", wd]) == 0
    _write(os.path.join(wd, "summary.json"), {"steps": 4, "complete": True})
    assert sw.run_status(wd) == "incomplete"
    assert sw.main(["status", wd]) == 1
    wd2 = str(tmp_path / "r2")
    assert sw.main(["status", wd2]) == 1
    os.makedirs(wd2)
    open(os.path.join(wd2, "DONE"), "w").close()
    assert sw.run_status(wd2) == "done"


def test_summary_of_run_dirs_without_manifest(tmp_path):
    root = str(tmp_path)
    for i, (t, loss) in enumerate([(0.9, 2.0), (0.8, 1.0), (0.7, 3.0)]):
        wd = os.path.join(root, f"run{i}")
        _write(os.path.join(wd, "config.json"),
               {"reward": {"temp_end": t}, "train": {"steps": 4}, "seed": 0})
        if i < 2:
            _write(os.path.join(wd, "summary.json"),
                   {"steps": 4, "wall_time_s": 1.5, "final_metrics": {"loss": loss},
                    "eval": {"after": {"acc": 1 - loss / 10}}})
            _write(os.path.join(wd, "eval_after.json"), {"acc": 1 - loss / 10, "note": "x"})
        else:  # still running: metrics.jsonl only
            with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
                f.write(json.dumps({"step": 0, "time": 1, "loss": 9.0}) + "\n")
                f.write(json.dumps({"step": 1, "time": 2, "loss": loss}) + "\n{broken\n")
    res = sw.summarize(root, metric="final.loss")
    with open(res["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == ["run0", "run1", "run2"]
    assert [r["reward.temp_end"] for r in table] == ["0.9", "0.8", "0.7"]
    assert [r["status"] for r in table] == ["done", "done", "incomplete"]
    assert [r["steps"] for r in table] == ["4", "4", "2"]
    assert [float(r["final.loss"]) for r in table] == [2.0, 1.0, 3.0]
    assert [r["after.acc"] for r in table] == ["0.8", "0.9", ""]
    assert "train.steps" not in table[0] and "note" not in " ".join(table[0])
    md = open(res["markdown"]).read().splitlines()
    assert md[2].startswith("| name | reward.temp_end | status | steps |")
    assert md[4].startswith("| run0 | 0.9 | done | 4 |") and len(md) == 7
    with open(res["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert res["plot"].endswith("summary_final.loss.png")
    with pytest.raises(ValueError, match="not a swept key"):
        sw.summarize(root, metric="final.loss", x="seed")


@pytest.mark.slow
@pytest.mark.optimized
def test_real_two_point_sweep_on_the_toy_task(tmp_path, monkeypatch, capsys):
    """Two real `gfn-jax train` runs (2 steps each), then `summary`; both values reach their
    runs (the reward temperature reaches temp_end after temp_horizon=1 step)."""
    spec = tmp_path / "toy.json"
    spec.write_text(json.dumps({
        "config": "configs/toy_exact.py", "grid": {"reward.temp_end": [0.5, 0.8]},
        "fixed": {"train.steps": 2, "eval.num_samples": 0, "train.ckpt_every": 0,
                  "reward.temp_horizon": 1, "train.samples_per_prompt": 4}}))
    root = tmp_path / "root"
    env = dict(os.environ, XLA_FLAGS=xla_flags())  # one CPU device
    cmd = [sys.executable, "-m", "gfn_jax.sweep"]
    out = subprocess.run(cmd + ["run", str(spec), "--root", str(root)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    for t in ("0.5", "0.8"):
        wd = root / f"temp_end-{t}"
        assert sw.run_status(str(wd)) == "done", (wd / "train.log").read_text()[-3000:]
        assert json.loads((wd / "config.json").read_text())["reward"]["temp_end"] == float(t)
    # a second `run` skips the finished runs; then `summary` (both in this process: the
    # entry point was exercised above, and each subprocess costs a JAX import)
    monkeypatch.chdir(REPO)
    capsys.readouterr()
    assert sw.main(["run", str(spec), "--root", str(root)]) == 0
    again = capsys.readouterr().out
    assert again.count("finished, skipped") == 2, again
    assert sw.main(["summary", str(root), "--metric", "final.reward_temperature"]) == 0
    with open(root / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == ["temp_end-0.5", "temp_end-0.8"]
    assert [r["status"] for r in table] == ["done", "done"] and [r["steps"] for r in table] == [
        "2", "2"]
    assert [float(r["final.reward_temperature"]) for r in table] == [0.5, 0.8]
    assert all(float(r["final.loss"]) == float(r["final.loss"]) for r in table)  # not NaN
    md = (root / "summary.md").read_text()
    assert "| temp_end-0.5 | 0.5 | done | 2 |" in md and "| temp_end-0.8 | 0.8 | done | 2 |" in md
    assert (root / "summary_final.reward_temperature.png").stat().st_size > 1000
