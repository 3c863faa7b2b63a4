"""Test set-up: 8 virtual CPU devices so multi-device code runs on one host."""

import os

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
# XLA:CPU's older elemental emitters instead of its MLIR fusion emitters: the tiny models'
# programs compile 2-3x faster (a toy train step: 4.4 -> 1.4 s at -O0, 8.4 -> 4.7 s fully
# optimised) and run as fast; the tests compile hundreds of them.
if "xla_cpu_use_fusion_emitters" not in flags:
    flags += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = flags.strip()
# Most XLA optimisation off (LLVM -O0): the tests compile hundreds of tiny programs (a tiny
# model's train step is ~800 CPU kernels) and run most of them a few times, so compiling, not
# running, dominates; this takes ~30-50% off each compile. Set through the environment so the
# processes tests start inherit it. Tests that train hundreds of steps are marked
# ``optimized`` and compile fully optimised (fixture below). JAX_DISABLE_MOST_OPTIMIZATIONS=0
# in the environment runs everything optimised.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache for the whole test run, shared by the pytest-xdist
# workers and the processes tests start (read from the environment), in a fresh directory per
# run: many tests build trainers whose programs another trainer of the same test (resume,
# CLI run, sharded twin) or file already compiled. tests/test_objective_registry.py alone on
# the idle 2-core machine: 372 s without, 243 s with. GFN_JAX_TEST_XLA_CACHE=0 turns it off.
# The process that creates it (the xdist controller, whose environment the workers inherit,
# or a plain pytest process) removes it at the end.
_OWN_CACHE = ""
if os.environ.get("GFN_JAX_TEST_XLA_CACHE", "1") == "1" and \
        "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    _OWN_CACHE = os.path.join(tempfile.gettempdir(), f"gfn-jax-test-xla-cache-pid{os.getpid()}")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
elif "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # off: runs the tests start must not fall back to the user's cache (~/.cache/gfn_jax/xla)
    os.environ.setdefault("JAX_ENABLE_COMPILATION_CACHE", "false")

import pytest  # noqa: E402

# Global JAX settings some in-process benchmark mains change (float32 on both sides of a
# side-by-side sets the default matmul precision to "highest"); each test starts from the
# values the session began with, so a test's outcome never depends on which ran before it.
_RESTORED = ("jax_default_matmul_precision",)


@pytest.fixture(autouse=True)
def _restore_jax_globals():
    import jax

    saved = {n: getattr(jax.config, n) for n in _RESTORED}
    yield
    for n, v in saved.items():
        if getattr(jax.config, n) != v:
            jax.config.update(n, v)


_FAST_COMPILE = os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() in ("1", "true")


@pytest.fixture(autouse=True)
def _xla_optimisation(request, monkeypatch):
    """Fully optimised compiles for tests marked ``optimized`` (run-time bound), in this
    process and in the processes it starts; the session's setting for every other test."""
    import jax

    want = _FAST_COMPILE and request.node.get_closest_marker("optimized") is None
    if not want:
        monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "0")
    jax.config.update("jax_disable_most_optimizations", want)
    yield
    jax.config.update("jax_disable_most_optimizations", _FAST_COMPILE)


def pytest_unconfigure(config):
    if _OWN_CACHE:
        import shutil

        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
