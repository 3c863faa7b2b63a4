"""gfn_jax.hostmem: with freed memory kept, a repeated XLA program stops faulting fresh pages."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from gfn_jax import hostmem

# A jitted program with two 64 MiB temporaries (above glibc's largest mmap threshold), which
# XLA allocates and frees on every call; prints the minor faults of calls 9-24. Kept, the heap
# grows by the working set now and then over the first ~30 calls (while XLA frees one call's
# buffers as the next allocates) and otherwise serves every call from pages it already has.
SCRIPT = r"""
import json, resource, sys
from gfn_jax import hostmem
done = hostmem.keep_freed_memory(sys.argv[1])
import jax, jax.numpy as jnp
def g(x):
    y = jax.lax.optimization_barrier(jnp.sin(x))
    z = jax.lax.optimization_barrier(y.T * 2.0)
    return jnp.sum(z * y)
f = jax.jit(g)
x = jnp.ones((4096, 4096), jnp.float32)
for _ in range(8):
    f(x).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(16):
    f(x).block_until_ready()
r1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"done": str(done), "faults": r1 - r0}))
"""


def _faults(setting: str) -> dict:
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    env.pop(hostmem.ENV, None)
    out = subprocess.run([sys.executable, "-c", SCRIPT, setting], env=env, check=True,
                         capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_kept_memory_stops_the_page_faults():
    system, keep = _faults("system"), _faults("keep")
    assert system["done"].startswith("system") and keep["done"] == "keep"
    # >= 128 MiB of temporaries = 32,768 pages: glibc's defaults fault them in on every call
    assert system["faults"] > 16 * 32_000, system
    # kept: 0 to 3 growths of 32,768 pages in 16 calls seen; the system allocator: 16 x 49,000
    assert keep["faults"] < system["faults"] / 3, (keep, system)


def test_bad_setting_names_the_variable():
    with pytest.raises(ValueError, match=hostmem.ENV):
        hostmem.keep_freed_memory("sometimes")


def test_system_setting_leaves_malloc_alone():
    assert not hostmem.keep_freed_memory("system").applied


def test_cli_rejects_a_bad_setting_before_it_starts(monkeypatch, capsys):
    from gfn_jax import cli

    monkeypatch.setenv(hostmem.ENV, "sometimes")
    assert cli.main(["gfn-jax", "train", "--config", "configs/rng.py"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "GFN_JAX_MALLOC='sometimes'" in err and "keep" in err and "system" in err


TRIM_SCRIPT = r"""
import ctypes, json, resource, sys
from gfn_jax import hostmem
hostmem.keep_freed_memory(sys.argv[1])
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n = 5 << 29  # 2.5 GiB: a free top above 2 GiB must not be trimmed either
faults = []
for _ in range(2):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(n)
    assert p, "malloc failed"
    ctypes.memset(p, 1, n)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(json.dumps(faults))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_a_freed_heap_above_2_gib_is_kept():
    def run(setting: str) -> list:
        out = subprocess.run([sys.executable, "-c", TRIM_SCRIPT, setting], check=True,
                             capture_output=True, text=True, timeout=120)
        return json.loads(out.stdout.strip().splitlines()[-1])

    pages = (5 << 29) // 4096
    assert run("system")[1] > pages * 0.9  # unmapped on free: faulted in again
    assert run("keep")[1] < pages * 0.01


# Reads the counters around known work in a fresh process: 0.3 s of busy Python, then 256 MiB
# of fresh memory written once. The module is loaded from its file alone (no JAX imported),
# so the process starts small.
USAGE_SCRIPT = r"""
import importlib.util, json, sys, time
import numpy as np
spec = importlib.util.spec_from_file_location("hostmem_alone", sys.argv[1])
hostmem = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hostmem)
u0 = hostmem.process_usage()
t = time.process_time()
while time.process_time() - t < 0.3:
    pass
busy = hostmem.usage_since(u0)
u1 = hostmem.process_usage()
a = np.empty(256 * 2 ** 20, np.uint8)
a.fill(1)
touched = hostmem.usage_since(u1)
print(json.dumps({"start": u0, "busy": busy, "touched": touched}))
"""


@pytest.mark.skipif(platform.system() != "Linux", reason="getrusage's units are Linux's here")
def test_process_usage_counts_cpu_time_faults_and_peak_memory(tmp_path):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    script = tmp_path / "usage.py"
    script.write_text(USAGE_SCRIPT)
    # Linux carries a parent's resident size into its exec'd child's peak: started from this
    # (large) pytest process, the script's peak would begin at pytest's size. Through a shell
    # that forks it, it begins at the shell's.
    out = subprocess.run(["sh", "-c", '"$0" "$1" "$2"; exit $?', sys.executable, str(script),
                          hostmem.__file__], env=env, check=True,
                         capture_output=True, text=True, timeout=300)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(r["start"]) == {"user_cpu_s", "system_cpu_s", "minor_faults", "major_faults",
                               "peak_rss_mb"}
    assert 0.25 <= r["busy"]["user_cpu_s"] + r["busy"]["system_cpu_s"] < 2.0
    # writing 256 MiB of fresh pages faults them in (fewer faults with huge pages); the peak
    # resident size is the process's, not a delta: what it had before plus the array
    assert r["touched"]["minor_faults"] >= 100
    start = r["start"]["peak_rss_mb"]
    assert r["busy"]["peak_rss_mb"] < start + 50
    assert start + 240 <= r["touched"]["peak_rss_mb"] < start + 400  # MiB, not KiB
