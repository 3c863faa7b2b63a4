"""The runs' persistent XLA compilation cache: on by default in ~/.cache/gfn_jax/xla, read
back by a repeated run, off with ``none``, clear error for a directory it cannot create."""

import glob
import os
import subprocess
import sys

import jax
import pytest
from tiny import xla_flags

from gfn_jax import cli
from gfn_jax.compile_cache import DEFAULT_MAX_BYTES, default_dir, enable_compilation_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "configs", "toy_exact.py")


def _env(home):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("JAX_COMPILATION_CACHE") and k != "JAX_ENABLE_COMPILATION_CACHE"}
    # one device, compiled with the faster-compiling emitters (tiny.xla_flags)
    return dict(env, PYTHONPATH=ROOT, XDG_CACHE_HOME=str(home), XLA_FLAGS=xla_flags(),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _train(tmp_path, name, home, *extra):
    cmd = [sys.executable, "-m", "gfn_jax.cli", "train", "--config", TOY, "--noprogress",
           "--workdir", str(tmp_path / name), "--config.train.steps=1",
           "--config.eval.num_samples=0", "--config.mesh.devices=1", *extra]
    out = subprocess.run(cmd, env=_env(home), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


def _atimes(d):
    """{entry: last-access stamp} of a JAX LRU cache directory (the stamp a read rewrites)."""
    out = {}
    for p in glob.glob(os.path.join(d, "*-atime")):
        with open(p, "rb") as f:
            out[os.path.basename(p)[: -len("-atime")]] = int.from_bytes(f.read(), "little")
    return out


def test_a_repeated_run_reads_its_programs_from_the_default_cache(tmp_path):
    home = tmp_path / "xdg"
    cache = os.path.join(str(home), "gfn_jax", "xla")
    _train(tmp_path, "a", home)
    entries = sorted(glob.glob(os.path.join(cache, "*-cache")))
    assert len(entries) >= 3, entries  # the train step, the sampler, the optimizer init, ...
    first = _atimes(cache)
    assert set(first) == {os.path.basename(e)[: -len("-cache")] for e in entries}
    # the same run again: every program is a cache hit (read, stamped), none is new
    _train(tmp_path, "b", home)
    assert sorted(glob.glob(os.path.join(cache, "*-cache"))) == entries
    second = _atimes(cache)
    hits = [k for k in first if second[k] > first[k]]
    assert len(hits) == len(first), (len(hits), len(first))
    # turned off: nothing is written anywhere under the cache home
    _train(tmp_path, "c", tmp_path / "xdg-off", "--config.train.compilation_cache=none")
    assert not os.path.exists(tmp_path / "xdg-off")


def test_settings_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_dir() == os.path.join(str(tmp_path), "gfn_jax", "xla")
    assert DEFAULT_MAX_BYTES == 4 * 1024 ** 3
    before = jax.config.jax_compilation_cache_dir
    assert enable_compilation_cache("none") is None
    assert enable_compilation_cache("") is None
    if before:  # a directory chosen elsewhere (here: the test run's) is kept by "auto"
        assert enable_compilation_cache("auto") == before
    assert jax.config.jax_compilation_cache_dir == before
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=r"config\.train\.compilation_cache: cannot create"):
        enable_compilation_cache(str(blocker / "sub"))
    assert jax.config.jax_compilation_cache_dir == before


def test_bad_setting_is_a_short_error_naming_the_key(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = cli.main(["gfn-jax", "train", "--config", TOY, "--workdir", str(tmp_path / "w"),
                   "--noprogress", f"--config.train.compilation_cache={blocker / 'sub'}"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_ERROR, err
    assert "config.train.compilation_cache" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 2, err  # the problem, then the --debug hint
