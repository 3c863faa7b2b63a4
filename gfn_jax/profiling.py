"""Kernel-level profiles from ``jax.profiler`` traces: which kernels ran, for how long, and
how much of the wall time the device was busy.

``jax.profiler.trace(dir, create_perfetto_trace=True)`` writes a Perfetto (Chrome trace
event) JSON next to its XPlane protobuf. This module reads that JSON and keeps the kernel
spans:

* on an accelerator (a process named ``/device:GPU:0``, ``/device:TPU:0``, ...): the spans on
  its stream lines (``Stream #N(...)``: the kernels and copies a GPU ran), else on its
  ``XLA Ops`` line (a TPU's ops), else on every line of the device;
* on XLA:CPU (no device process): the spans of the host's threads less the runtime's and
  Python's own (``PjitFunction``, ``ThunkExecutor``, ``$file.py:N``, ...): each kernel runs
  as a span on the thread that ran it.

:func:`summarize` turns them into the share of a wall time with at least one kernel running
(``busy``; the rest is launch overhead, host work and synchronisation) and the span time per
kernel kind. ``gfn-jax bench --trace-dir DIR``, ``benchmarks/kernel_profile.py`` and the
training loop's ``train.profile_steps`` (:class:`StepProfiler`) use it.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import logging
import os
import re
import time
from typing import Any, Dict, List, NamedTuple, Optional

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["Span", "kernel_spans", "busy_time", "kernel_kind", "summarize", "describe",
           "start_trace", "StepProfiler"]

# spans of the runtime and of Python on XLA:CPU, not kernels
_NOT_KERNELS = ("ThunkExecutor", "$", "SlinkyThreadPool", "end:", "PjitFunction",
                "CommonPjRt", "PjRt", "Execute", "TfrtCpu", "np.asarray")


class Span(NamedTuple):
    """One kernel span: its name, start and duration (µs), and the track (thread) it ran on."""

    name: str
    start_us: float
    dur_us: float
    track: Any


def _trace_file(trace_dir: str) -> str:
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(
            f"no *.trace.json.gz under {trace_dir!r}: trace with "
            "jax.profiler.trace(dir, create_perfetto_trace=True)")
    return files[-1]  # the newest: a directory traced twice holds two


def kernel_spans(trace_dir: str) -> List[Span]:
    """Every kernel span of the newest Perfetto trace under ``trace_dir`` (see the module's
    docstring for what counts as a kernel on a device and on XLA:CPU)."""
    with gzip.open(_trace_file(trace_dir)) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs: Dict[Any, str] = {}
    threads: Dict[Any, str] = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e.get("pid")] = str(e.get("args", {}).get("name", ""))
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e.get("pid"), e.get("tid"))] = str(e.get("args", {}).get("name", ""))
    device_pids = {pid for pid, n in procs.items() if n.startswith("/device:")}
    if device_pids:
        # per device: its stream lines (GPU kernels and copies), else its "XLA Ops" line
        # (TPU), else every line it has; never the derived lines beside them (modules, steps)
        kept: set = set()
        for pid in device_pids:
            lines = {k: n for k, n in threads.items() if k[0] == pid}
            pick = ({k for k, n in lines.items() if n.startswith("Stream")}
                    or {k for k, n in lines.items() if n == "XLA Ops"})
            kept |= pick if pick else {("all", pid)}

        def keep(e: Dict[str, Any]) -> bool:
            key = (e.get("pid"), e.get("tid"))
            return key in kept or ("all", key[0]) in kept
    else:
        def keep(e: Dict[str, Any]) -> bool:
            return not str(e.get("name", "")).startswith(_NOT_KERNELS)

    out = []
    for e in events:
        if e.get("ph") == "X" and keep(e):
            key = (e.get("pid"), e.get("tid"))
            out.append(Span(str(e["name"]), float(e["ts"]), float(e.get("dur", 0.0)),
                            threads.get(key, key)))
    return out


def busy_time(spans: List[Span]) -> float:
    """Length (µs) of the union of the spans' intervals: the time with any kernel running."""
    total, end = 0.0, -np.inf
    for s in sorted(spans, key=lambda s: s[1]):
        t0, d = s[1], s[2]
        if t0 + d > end:  # the part of this span after everything before it
            total += t0 + d - max(t0, end)
            end = t0 + d
    return total


def kernel_kind(name: str) -> str:
    """A kernel's kind: its name without XLA's numeric suffixes (``loop_fusion.23`` ->
    ``loop_fusion``, ``input_reduce_fusion_12`` -> ``input_reduce_fusion``)."""
    return re.sub(r"([._]\d+)+$", "", name)


def summarize(spans: List[Span], wall_s: float, calls: int = 1,
              top: int = 10) -> Dict[str, Any]:
    """Busy share of ``wall_s`` (the traced calls' wall time) and the ``top`` kernel kinds by
    span time, per call (span times are summed over tracks, so they can exceed the wall)."""
    calls = max(1, int(calls))
    by: Dict[str, float] = collections.Counter()
    cnt: Dict[str, int] = collections.Counter()
    for s in spans:
        by[kernel_kind(s.name)] += s.dur_us
        cnt[kernel_kind(s.name)] += 1
    busy_us = busy_time(spans)
    return {
        "wall_ms": wall_s * 1e3 / calls,
        "busy_ms": busy_us / 1e3 / calls,
        "busy_fraction": None if wall_s <= 0 else min(1.0, busy_us / 1e6 / wall_s),
        "kernels": len(spans) // calls,
        "span_ms": sum(s.dur_us for s in spans) / 1e3 / calls,
        "tracks": sorted({str(s.track) for s in spans}),
        "top": [{"kind": k, "count": cnt[k] / calls, "ms": d / 1e3 / calls}
                for k, d in by.most_common(top)],
    }


def describe(summary: Optional[Dict[str, Any]], top: int = 5) -> str:
    """One line of :func:`summarize`'s figures: busy share, kernels, the ``top`` kinds."""
    if not summary:
        return "n/a"
    if "error" in summary:
        return f"no kernel figures ({summary['error']})"
    frac = summary["busy_fraction"]
    kinds = ", ".join(f"{t['kind']} {t['ms']:.3g} ms ({t['count']:.0f}x)"
                      for t in summary["top"][:top])
    return (f"{summary['wall_ms']:.4g} ms wall, a kernel running "
            f"{'n/a' if frac is None else f'{100 * frac:.0f}%'} of it; "
            f"{summary['kernels']} kernels, {summary['span_ms']:.4g} ms of spans; top: {kinds}")


def start_trace(log_dir: str, python: bool = False) -> None:
    """``jax.profiler.start_trace`` with a Perfetto trace; ``python=False`` leaves out the
    Python function tracer, which records every Python call and slows a Python-heavy loop
    (a training step's sampling, rewards and replay) several-fold while it runs."""
    import jax

    kw: Dict[str, Any] = {}
    if not python and hasattr(jax.profiler, "ProfileOptions"):
        kw["profiler_options"] = jax.profiler.ProfileOptions()
        kw["profiler_options"].python_tracer_level = 0
    jax.profiler.start_trace(log_dir, create_perfetto_trace=True, **kw)


class StepProfiler:
    """Traces steps ``[start, start + count)`` of a training loop with ``jax.profiler``.

    Call :meth:`before` ahead of each step and :meth:`after` once the step's results are on
    the host. Tracing begins at the first step of that range the run executes (a resumed run
    may begin inside it) and ends after its last step, or at :meth:`close` (a run stopped
    early). Each process writes its own trace into ``workdir/profile/process_<i>``, then
    ``summary.json`` beside it (:func:`summarize` of the traced steps); :meth:`after` and
    :meth:`close` return that summary once, else ``None``. ``count == 0`` does nothing.
    """

    def __init__(self, workdir: str, start: int, count: int, python: bool = False) -> None:
        import jax

        self.start, self.count, self.python = int(start), int(count), bool(python)
        self.dir = os.path.join(os.fspath(workdir), "profile", f"process_{jax.process_index()}")
        self.first: Optional[int] = None
        self.last: Optional[int] = None
        self._t0 = 0.0

    @property
    def active(self) -> bool:
        return self.first is not None and self.last is None

    def before(self, step: int) -> None:
        if (self.count > 0 and self.first is None
                and self.start <= step < self.start + self.count):
            try:
                os.makedirs(self.dir, exist_ok=True)
                start_trace(self.dir, python=self.python)
            except Exception as e:  # noqa: BLE001 - e.g. a trace the caller already runs
                self.count = 0  # a profile is a diagnostic: the run goes on without it
                log.warning("train.profile_steps: no profile, the trace did not start (%s: %s)",
                            type(e).__name__, e)
                return
            self.first = int(step)
            self._t0 = time.perf_counter()

    def after(self, step: int) -> Optional[Dict[str, Any]]:
        if self.active and step >= self.start + self.count - 1:
            return self._finish(int(step))
        return None

    def close(self, step: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """End a trace still running (the loop stopped inside the range)."""
        if self.active:
            return self._finish(int(step) if step is not None else int(self.first or 0))
        return None

    def _finish(self, step: int) -> Dict[str, Any]:
        import jax

        wall = time.perf_counter() - self._t0
        jax.profiler.stop_trace()
        self.last = step
        n = step - int(self.first or 0) + 1
        try:
            out: Dict[str, Any] = summarize(kernel_spans(self.dir), wall, calls=n)
        except (FileNotFoundError, ValueError, OSError) as e:  # no trace: say so, never fail
            out = {"error": f"{type(e).__name__}: {e}"}
        out.update(first_step=self.first, last_step=step, steps=n, trace_dir=self.dir)
        with open(os.path.join(self.dir, "summary.json"), "w") as f:
            json.dump(out, f, indent=2)
        return out
