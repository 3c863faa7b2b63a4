"""Timing helper shared by the benchmark scripts (run as ``python benchmarks/NAME.py``, which
puts this folder on ``sys.path``)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def median_ms(reps: int, f: Callable[..., Any], *args: Any) -> float:
    """Median wall time of ``f(*args)`` in milliseconds over ``reps`` calls after a warm-up
    call (which also compiles), each waited for with ``jax.block_until_ready``."""
    import jax

    jax.block_until_ready(f(*args))
    times = []
    for _ in range(max(1, int(reps))):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3
