"""Test set-up: 8 virtual CPU devices so multi-device code runs on one host."""

import os

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
# XLA:CPU's older elemental emitters (``xla_cpu_use_fusion_emitters=False``) compile the tiny
# models' programs 2-3x faster than its default fusion emitters (a toy train step at -O0:
# 1.4 vs 4.4 s; the whole suite: 16.5 min with them for single-device programs, 25.0 min
# without), but they make XLA:CPU's collective-order deadlock far likelier: the toy train
# step on the fsdp=8 mesh of 8 virtual devices aborted on its first step in 5 of 5 runs with
# them (devices meet two all-reduces in different orders; XLA gives up after 40 s), against
# 0 in 900 steps with the default emitters, which are not immune either
# (docs/reliability.md). So the tests ask for the older emitters per program, only for
# programs on one device (no collectives), through the per-compile options jax.jit also
# takes (``compiler_options``); see _single_device_programs_compile_fast below. Never put
# the flag in XLA_FLAGS, which would apply it to every program.
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


def _single_device_programs_compile_fast() -> None:
    """Wrap JAX's compile-options builder so that a program on one device (one replica, one
    partition) compiles with XLA:CPU's faster-compiling elemental emitters; programs on
    several devices keep XLA's defaults (see the comment above). The option travels in the
    compile options, so the persistent compilation cache keys the two kinds apart. Does
    nothing if this JAX has no such function (the tests then compile with the defaults)
    or if GFN_JAX_TEST_ELEMENTAL_EMITTERS=0."""
    if os.environ.get("GFN_JAX_TEST_ELEMENTAL_EMITTERS", "1") != "1":
        return
    if jax_platform_is_cpu() and not _elemental_emitters_exist():
        # newer XLA:CPU (jaxlib 0.11) has no such option and rejects it: say so to the
        # processes tests start (tiny.xla_flags) and to the tests that need the emitters
        os.environ["GFN_JAX_TEST_ELEMENTAL_EMITTERS"] = "0"
        return
    try:
        from jax._src import compiler
    except ImportError:
        return
    inner = getattr(compiler, "get_compile_options", None)
    if inner is None or getattr(inner, "_gfn_jax_single_device_emitters", False):
        return
    import inspect

    try:
        sig = inspect.signature(inner)
    except (TypeError, ValueError):
        return
    if not {"num_replicas", "num_partitions", "env_options_overrides"} <= set(sig.parameters):
        return

    def get_compile_options(*args, **kwargs):
        bound = sig.bind_partial(*args, **kwargs)
        n = bound.arguments.get("num_replicas", 1) * bound.arguments.get("num_partitions", 1)
        if n == 1 and jax_platform_is_cpu():
            overrides = dict(bound.arguments.get("env_options_overrides") or {})
            overrides.setdefault("xla_cpu_use_fusion_emitters", False)
            bound.arguments["env_options_overrides"] = overrides
        return inner(*bound.args, **bound.kwargs)

    get_compile_options._gfn_jax_single_device_emitters = True
    compiler.get_compile_options = get_compile_options


def _elemental_emitters_exist() -> bool:
    """Whether this XLA:CPU accepts ``xla_cpu_use_fusion_emitters`` (jaxlib 0.10 does;
    0.11 fails the compile with "No such compile option"). Probed by compiling a one-op
    program with the option, before the wrapper below is installed."""
    import jax
    import numpy as np

    try:
        jax.jit(lambda x: x + 1).lower(np.float32(1)).compile(
            {"xla_cpu_use_fusion_emitters": False})
    except Exception:  # noqa: BLE001 - any rejection means: do not ask for the option
        return False
    return True


def jax_platform_is_cpu() -> bool:
    return os.environ.get("JAX_PLATFORMS", "cpu").split(",")[0] in ("", "cpu")


_single_device_programs_compile_fast()

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


# The test files that take longest, longest first (one worker's seconds in a full `-n 2`
# run with `--durations`, 2026-12-03: test_train.py ~530 s, the objective registry ~360 s,
# shared prompts ~290 s, ...). pytest-xdist's ``--dist loadfile`` hands files to the
# workers in queue order, by default the files with the most tests first; a long file with
# few tests then came last and kept one worker busy for minutes after the other had
# finished (the last 2% of a CI run took 4 of its 22 min). Longest first balances them.
_LONG_FILES = (
    "test_train.py", "test_objective_registry.py", "test_shared_prompt.py",
    "test_baselines.py", "test_distributed_train.py", "test_bench.py", "test_subj.py",
    "test_sweep.py", "test_rollout.py", "test_cli_reliability.py", "test_memory.py",
    "test_lm_tasks.py", "test_compile_cache.py", "test_policy.py", "test_smollm2.py",
    "test_data_stream_train.py", "test_stories.py", "test_continuation_protocol.py",
)


def pytest_configure(config):
    if getattr(config.option, "loadscopereorder", None) is not None:
        config.option.loadscopereorder = False  # keep the collection order set below


def pytest_collection_modifyitems(session, config, items):
    rank = {name: k for k, name in enumerate(_LONG_FILES)}
    items[:] = sorted(items, key=lambda it: rank.get(os.path.basename(str(it.path)), len(rank)))


def pytest_unconfigure(config):
    if _OWN_CACHE:
        import shutil

        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
