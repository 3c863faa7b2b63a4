"""Keep freed host memory in the process instead of handing it back to the kernel (glibc).

XLA:CPU allocates each program's temporaries with ``malloc`` and frees them when the program
ends. glibc serves allocations above its mmap threshold (at most 32 MiB) with fresh ``mmap``
regions and unmaps them on ``free``; smaller ones come from per-thread arenas whose tops are
trimmed back to the kernel. So every train step faults its working set back in, page by
page, from zeroed memory: one iteration of the infilling benchmark on SmolLM2-135M (sampling,
reward, train steps) made 1.15 M minor faults (4.7 GB) and 2.2 s of system time on this
project's 2-core CPU VM. There, while another large process ran in between (the official
PyTorch code, side by side in ``benchmarks/bench_official.py``), each fault cost ~4x more:
9.5 s of system time per step (``docs/performance.md``, "Page faults"; the VM's balloon
reports free pages to its host, the likely reason).

:func:`keep_freed_memory` tells glibc to serve every allocation from one heap that it never
trims: ``M_MMAP_MAX = 0``, ``M_TRIM_THRESHOLD`` = never, ``M_ARENA_MAX = 1``.
After its first steps the process reuses its own pages and the faults stop (a heap shared
with another library's allocations, e.g. torch's, may still grow now and then). The price: the
process keeps its peak heap for its lifetime (its resident size does not fall after a large
evaluation batch, for instance). The ``gfn-jax`` command calls it before JAX starts its
threads unless ``GFN_JAX_MALLOC=system``; a library user calls it at the top of a program.
It does nothing (and says why) on a C library other than glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from typing import Dict, Optional

__all__ = ["ENV", "keep_freed_memory", "malloc_setting", "MallocSetting", "process_usage",
           "usage_since"]

#: Environment variable read by the ``gfn-jax`` command: ``keep`` (default) or ``system``.
ENV = "GFN_JAX_MALLOC"

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# mallopt takes an int; glibc stores the trim threshold as a size_t, so -1 means "never"
# (INT_MAX would still trim a free top above 2 GiB, which a large step frees)
_NEVER = -1


class MallocSetting(str):
    """What :func:`keep_freed_memory` did: ``"keep"`` when applied, otherwise a reason."""

    @property
    def applied(self) -> bool:
        return self == "keep"


_APPLIED: Optional[MallocSetting] = None


def _glibc() -> Optional[ctypes.CDLL]:
    if platform.system() != "Linux":
        return None
    libc_name, _ = platform.libc_ver()
    if libc_name != "glibc":
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    return lib if hasattr(lib, "mallopt") else None


def keep_freed_memory(setting: Optional[str] = None) -> MallocSetting:
    """Make glibc's malloc keep freed memory in this process (see the module docstring).

    ``setting``: ``"keep"`` applies it, ``"system"`` leaves malloc alone; None reads
    :data:`ENV` (default ``keep``). Call it before the first JAX computation, so that XLA's
    worker threads, created with the backend, share the one arena. Idempotent; returns what
    was done. Raises ``ValueError`` for a setting other than ``keep`` / ``system``."""
    global _APPLIED
    if setting is None:
        setting = os.environ.get(ENV, "keep")
    setting = setting.strip().lower()
    if setting not in ("keep", "system"):
        raise ValueError(f"{ENV}={setting!r}: use 'keep' (reuse freed host memory) or 'system' "
                         "(glibc's defaults)")
    if setting == "system":
        return MallocSetting("system (glibc's defaults, as asked)")
    if _APPLIED is not None:
        return _APPLIED
    lib = _glibc()
    if lib is None:
        _APPLIED = MallocSetting("system (not glibc: left as it is)")
        return _APPLIED
    ok = all(lib.mallopt(p, v) == 1 for p, v in ((_M_MMAP_MAX, 0),
                                                  (_M_TRIM_THRESHOLD, _NEVER),
                                                  (_M_ARENA_MAX, 1)))
    _APPLIED = MallocSetting("keep" if ok else "system (mallopt refused a parameter)")
    return _APPLIED


def malloc_setting() -> str:
    """What this process's malloc does: ``"keep"`` once :func:`keep_freed_memory` applied it,
    otherwise ``"system"`` (glibc's or the platform's defaults)."""
    return "keep" if _APPLIED is not None and _APPLIED.applied else "system"


def process_usage() -> Dict[str, float]:
    """This process's counters so far (all threads): CPU seconds in user and kernel mode,
    minor and major page faults, peak resident size in MiB (``getrusage``; zeros where the
    platform has no ``resource`` module). On Linux a process started directly by a larger
    one (``subprocess``) begins with its parent's resident size as its peak."""
    try:
        import resource
    except ImportError:  # not a Unix
        return {"user_cpu_s": 0.0, "system_cpu_s": 0.0, "minor_faults": 0.0,
                "major_faults": 0.0, "peak_rss_mb": 0.0}
    r = resource.getrusage(resource.RUSAGE_SELF)
    rss_unit = 1.0 if sys.platform == "darwin" else 1024.0  # bytes on macOS, KiB elsewhere
    return {"user_cpu_s": r.ru_utime, "system_cpu_s": r.ru_stime,
            "minor_faults": float(r.ru_minflt), "major_faults": float(r.ru_majflt),
            "peak_rss_mb": r.ru_maxrss * rss_unit / 2 ** 20}


def usage_since(start: Dict[str, float]) -> Dict[str, float]:
    """:func:`process_usage` counted from ``start`` (an earlier reading); the peak resident
    size stays the process's peak so far."""
    now = process_usage()
    return {k: (v if k == "peak_rss_mb" else v - start.get(k, 0.0)) for k, v in now.items()}
