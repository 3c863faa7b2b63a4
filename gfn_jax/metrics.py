"""Metric logging (JSON lines + TensorBoard) and plots (matplotlib, Agg canvas).

``workdir/metrics.jsonl`` holds one JSON object per ``write``:
``{"step": int, "time": unix seconds, "<name>": float | null | "inf" | "-inf", ...}``
(NaN is written as ``null``; infinities as strings so the file stays strict JSON).
:func:`read_metrics` turns those back into floats. TensorBoard scalars go to
``workdir/tb/``. Only process 0 writes (multi-host safe).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import jax
import numpy as np

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TB_DIR = "tb"
_RESERVED = ("step", "time")


def _scalar(name: str, value: Any) -> float:
    """One metric value as a Python float (jax/numpy scalars or size-1 arrays)."""
    try:
        arr = np.asarray(jax.device_get(value))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"metric {name!r}: cannot convert {type(value).__name__} to a number") from e
    if arr.size != 1 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"metric {name!r} must be a real scalar, got {arr.dtype} array of shape {arr.shape}")
    if np.iscomplexobj(arr):
        raise ValueError(f"metric {name!r} must be real, got {arr.dtype}")
    return float(arr.reshape(()))


def _encode(x: float) -> Union[float, str, None]:
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _decode(x: Any) -> Any:
    if x is None:
        return float("nan")
    if x == "inf":
        return float("inf")
    if x == "-inf":
        return float("-inf")
    return x


def _json_safe(obj: Any) -> Any:
    """Summaries: numpy/jax -> Python, NaN -> null, inf -> strings, tuples -> lists."""
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.ndarray, jax.Array)):
        return _json_safe(np.asarray(obj).tolist())
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    if isinstance(obj, float):
        return _encode(obj)
    return obj


def _parse_lines(path: str) -> List[Dict[str, Any]]:
    """Raw records of a metrics file; malformed lines (e.g. a crash mid-write) are skipped."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                log.warning("%s:%d: skipping malformed metrics line", path, i + 1)
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                out.append(rec)
            else:
                log.warning("%s:%d: skipping metrics line without an integer step", path, i + 1)
    return out


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """Records of ``path`` (a metrics.jsonl file or a workdir holding one), in file order.

    ``null`` values come back as NaN and ``"inf"``/``"-inf"`` as infinities.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics file at {path}")
    return [{k: (_decode(v) if k not in _RESERVED else v) for k, v in r.items()} for r in _parse_lines(path)]


def truncate_metrics(path: str, last_step: int) -> int:
    """Atomically drop records with ``step > last_step`` (and malformed lines); returns kept count."""
    kept = [r for r in _parse_lines(path) if r["step"] <= last_step]
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        for r in kept:
            f.write(json.dumps(r, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(kept)


class MetricsWriter:
    """Appends scalars to ``workdir/metrics.jsonl`` and TensorBoard (``workdir/tb``).

    Args:
      workdir: run directory (created).
      use_tensorboard: also write TensorBoard event files with tensorboardX.
      resume_step: when resuming from a checkpoint at this step, records with a larger
        step are dropped from the existing file (and TensorBoard is told to purge them),
        so the file never holds duplicated steps. ``None`` appends to any existing file.
    """

    def __init__(self, workdir: str, use_tensorboard: bool = True, resume_step: Optional[int] = None) -> None:
        self.workdir = os.fspath(workdir)
        self.path = os.path.join(self.workdir, METRICS_FILE)
        self.is_main = jax.process_index() == 0
        self._file = None
        self._tb = None
        if not self.is_main:
            return
        os.makedirs(self.workdir, exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            truncate_metrics(self.path, int(resume_step))
        self._file = open(self.path, "a", buffering=1)
        if use_tensorboard:
            from tensorboardX import SummaryWriter

            purge = int(resume_step) + 1 if resume_step is not None else None
            self._tb = SummaryWriter(logdir=os.path.join(self.workdir, TB_DIR), purge_step=purge, flush_secs=10)

    def write(self, step: int, scalars: Mapping[str, Any]) -> Dict[str, Any]:
        """Log ``scalars`` at ``step``; returns the JSON record (also on non-main processes)."""
        values = {}
        for k, v in scalars.items():
            if not isinstance(k, str) or not k:
                raise ValueError(f"metric names must be non-empty strings, got {k!r}")
            if k in _RESERVED:
                raise ValueError(f"metric name {k!r} is reserved")
            values[k] = _scalar(k, v)
        record: Dict[str, Any] = {"step": int(step), "time": time.time()}
        record.update({k: _encode(v) for k, v in values.items()})
        if self._file is not None:
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, int(step))
        return record

    def write_summary(self, summary: Mapping[str, Any]) -> Optional[str]:
        """Write ``workdir/summary.json`` (atomically); returns its path on the main process."""
        if not self.is_main:
            return None
        path = os.path.join(self.workdir, SUMMARY_FILE)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(_json_safe(dict(summary)), f, indent=2, allow_nan=False)
        os.replace(tmp, path)
        return path

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_metrics(workdir: str, keys: Optional[Sequence[str]] = None, out: Optional[str] = None) -> str:
    """One panel per metric vs step (from ``workdir/metrics.jsonl``); returns the PNG path."""
    records = read_metrics(workdir)
    if not records:
        raise ValueError(f"no metrics recorded in {workdir}")
    available = sorted({k for r in records for k in r if k not in _RESERVED})
    if keys is None:
        keys = available
    unknown = [k for k in keys if k not in available]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; available: {available}")
    if not keys:
        raise ValueError(f"nothing to plot in {workdir}")
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = _figure(4.0 * ncols, 3.0 * nrows)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        pts = sorted((r["step"], r[key]) for r in records if key in r and isinstance(r[key], (int, float)))
        steps = np.array([p[0] for p in pts], dtype=np.float64)
        vals = np.array([p[1] for p in pts], dtype=np.float64)
        vals = np.where(np.isfinite(vals), vals, np.nan)
        ax.plot(steps, vals, marker="." if len(steps) < 50 else None, linewidth=1.2)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = os.fspath(out) if out is not None else os.path.join(os.fspath(workdir), "metrics.png")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, format="png")
    return out


def plot_histogram(
    counts: Union[Sequence[float], Mapping[str, Sequence[float]]],
    labels: Sequence[str],
    out: str,
    title: str = "",
    normalize: bool = False,
) -> str:
    """Categorical histogram PNG; a mapping ``{series: counts}`` gives side-by-side bars.

    E.g. ``plot_histogram({"before": c0, "after": c1}, [str(i) for i in range(100)], "h.png")``.
    ``normalize`` divides each series by its total. Returns ``out``.
    """
    series = dict(counts) if isinstance(counts, Mapping) else {"": counts}
    labels = [str(l) for l in labels]
    if not series:
        raise ValueError("plot_histogram: no series given")
    arrays = {}
    for name, c in series.items():
        arr = np.asarray(c, dtype=np.float64)
        if arr.shape != (len(labels),):
            raise ValueError(
                f"plot_histogram: series {name!r} has shape {arr.shape}, expected ({len(labels)},) to match labels"
            )
        if normalize:
            total = arr.sum()
            arr = arr / total if total > 0 else arr
        arrays[name] = arr
    n = len(arrays)
    x = np.arange(len(labels))
    width = 0.8 / n
    fig = _figure(max(6.0, 0.12 * len(labels) * n + 2.0), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, arr) in enumerate(arrays.items()):
        ax.bar(x + (i - (n - 1) / 2) * width, arr, width=width, label=name or None)
    step = max(1, len(labels) // 40)
    ax.set_xticks(x[::step])
    ax.set_xticklabels(labels[::step], rotation=90 if len(labels) > 10 else 0, fontsize=8)
    ax.set_ylabel("fraction" if normalize else "count")
    if title:
        ax.set_title(title)
    if n > 1 or next(iter(arrays)):
        ax.legend()
    fig.tight_layout()
    out = os.fspath(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, format="png")
    return out
