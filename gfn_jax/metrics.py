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
import sys
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


def _summary_writer_class() -> Any:
    """``tensorboardX.SummaryWriter``, imported without PyTorch: tensorboardX imports torch,
    when installed, only for a type hint, which costs ~2 s per process on a 2-core machine.
    A torch the process already imported is left alone."""
    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` fail
        try:
            import tensorboardX
        finally:
            del sys.modules["torch"]
    else:
        import tensorboardX
    return tensorboardX.SummaryWriter


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
            try:
                SummaryWriter = _summary_writer_class()
            except ImportError as e:  # e.g. a locked-down GPU image running from source
                log.warning("TensorBoard event files are not written: tensorboardX cannot be "
                            "imported (%s); %s still is. `pip install tensorboardX` to get "
                            "them.", e, METRICS_FILE)
                return
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


# The default figure: the few curves that tell a run's story, in this order (the first key
# of each group that is logged and not constant): (keys, panel title, y-axis label).
STORY_PANELS = (
    (("loss",), "training loss", "loss"),
    (("log_r", "log_r_mean", "mean_log_r"), "mean log-reward of the batch", "mean log R (nats)"),
    (("samples_per_s", "tokens_per_s"), "throughput", None),
)
# Task metrics worth a panel when logged (metrics.jsonl) or evaluated (eval_*.json), first hit
# wins: (key, y-axis label).
HEADLINE_METRICS = (
    ("tv_to_target", "total variation to the target"),
    ("tv_to_uniform", "total variation to uniform"),
    ("label_accuracy", "label accuracy"),
    ("accuracy", "accuracy"),
    ("mean_log_p_base", "mean log p_base (nats)"),
)
# Never plotted as a curve: an index into the behaviour names, not a quantity.
CATEGORICAL = ("behaviour",)
UNITS = {"tokens_per_s": "tokens / s", "samples_per_s": "samples / s", "step_time": "s",
         "sample_time": "s", "eval_time_s": "s", "log_r": "nats", "log_q": "nats",
         "log_r_mean": "nats", "mean_log_r": "nats"}


def _series(records: Sequence[Mapping[str, Any]], key: str) -> "tuple[np.ndarray, np.ndarray]":
    pts = sorted((r["step"], r[key]) for r in records
                 if key in r and isinstance(r[key], (int, float)) and not isinstance(r[key], bool))
    steps = np.array([p[0] for p in pts], dtype=np.float64)
    vals = np.array([p[1] for p in pts], dtype=np.float64)
    return steps, np.where(np.isfinite(vals), vals, np.nan)


def _is_constant(vals: np.ndarray) -> bool:
    fin = vals[np.isfinite(vals)]
    return fin.size == 0 or bool(np.all(fin == fin[0]))


def _eval_points(workdir: str, key: str, last_step: float) -> List["tuple[float, float, str]"]:
    """(step, value, tag) of ``key`` in the run's ``eval_<tag>.json`` files: ``before`` at
    step 0, ``after`` at the last step, ``step<N>`` at N."""
    import glob
    import re

    out = []
    for path in sorted(glob.glob(os.path.join(workdir, "eval_*.json"))):
        tag = os.path.basename(path)[len("eval_"):-len(".json")]
        try:
            with open(path) as f:
                value = json.load(f).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        m = re.fullmatch(r"step(\d+)", tag)
        step = 0.0 if tag == "before" else last_step if tag == "after" else \
            float(m.group(1)) if m else None
        if step is not None:
            out.append((step, float(value), tag))
    return sorted(out)


def _draw_line(ax: Any, steps: np.ndarray, vals: np.ndarray, **kw: Any) -> None:
    ax.plot(steps, vals, marker="." if len(steps) < 50 else None, linewidth=1.2, **kw)


def _story_panels(records: Sequence[Mapping[str, Any]], workdir: str) -> List[Dict[str, Any]]:
    panels: List[Dict[str, Any]] = []
    for keys, title, ylabel in STORY_PANELS:
        for key in keys:
            steps, vals = _series(records, key)
            if steps.size and not _is_constant(vals):
                panels.append(dict(kind="line", key=key, title=title, steps=steps, vals=vals,
                                   ylabel=ylabel or UNITS.get(key, key)))
                break
    last = float(max(r["step"] for r in records))
    for key, label in HEADLINE_METRICS:
        steps, vals = _series(records, key)
        evals = _eval_points(workdir, key, last)
        if (steps.size and not _is_constant(vals)) or evals:
            panels.append(dict(kind="headline", key=key, title=f"task metric: {key}",
                               steps=steps, vals=vals, evals=evals, ylabel=label))
            break
    return panels


def _draw_panel(ax: Any, p: Mapping[str, Any]) -> None:
    steps, vals = p["steps"], p["vals"]
    ylabel = p["ylabel"]
    if p["kind"] == "headline":
        if steps.size:
            _draw_line(ax, steps, vals, label="training")
        for step, value, tag in p["evals"]:
            ax.plot([step], [value], marker="o", linestyle="none", markersize=7,
                    label=f"evaluation: {tag} = {value:.3g}")
        ax.legend(fontsize=8)
    else:
        _draw_line(ax, steps, vals)
        fin = vals[np.isfinite(vals)]
        if p["key"] == "loss" and fin.size and np.all(fin > 0):
            ax.set_yscale("log")
            ylabel = f"{ylabel} (log scale)"
    ax.set_title(p["title"], fontsize=10)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3, which="both")


def plot_metrics(workdir: str, keys: Union[None, str, Sequence[str]] = None,
                 out: Optional[str] = None) -> str:
    """Plot ``workdir/metrics.jsonl`` against the training step; returns the PNG path.

    - ``keys=None`` (default): ``metrics.png``, the few curves that tell the run's story --
      the loss (log scale when positive), the batch's mean log R, the throughput
      (samples or tokens per second) and the task's headline metric (:data:`HEADLINE_METRICS`)
      when it is logged or the run has ``eval_*.json`` files (points at their steps); constant
      series are left out.
    - ``keys="all"``: ``metrics_all.png``, one panel per metric in alphabetical order,
      without constant series and the behaviour index (the constants' values are listed at
      the bottom).
    - ``keys=[...]``: one panel per named metric (``metrics.png`` unless ``out`` is given).
    """
    fig, default_name = metrics_figure(workdir, keys)
    out = os.fspath(out) if out is not None else os.path.join(os.fspath(workdir), default_name)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, format="png")
    return out


def metrics_figure(workdir: str, keys: Union[None, str, Sequence[str]] = None) -> Any:
    """``(figure, default file name)`` of :func:`plot_metrics` (a matplotlib Figure on an
    Agg canvas, laid out, not saved)."""
    workdir = os.fspath(workdir)
    records = read_metrics(workdir)
    if not records:
        raise ValueError(f"no metrics recorded in {workdir}")
    available = sorted({k for r in records for k in r if k not in _RESERVED})
    note = ""
    if keys is None:
        panels = _story_panels(records, workdir)
        if not panels:
            raise ValueError(f"nothing to plot in {workdir}: every metric is constant")
        default_name = "metrics.png"
    else:
        if isinstance(keys, str) and keys == "all":
            chosen, constant = [], []
            for k in available:
                if k in CATEGORICAL:
                    continue
                (constant if _is_constant(_series(records, k)[1]) else chosen).append(k)
            if constant:
                def value(k: str) -> str:
                    v = _series(records, k)[1]
                    fin = v[np.isfinite(v)]
                    return f"{k}={fin[0]:.4g}" if fin.size else f"{k}=nan"
                note = "constant, not drawn: " + ", ".join(value(k) for k in constant)
            default_name = "metrics_all.png"
        else:
            chosen = [keys] if isinstance(keys, str) else list(keys)
            unknown = [k for k in chosen if k not in available]
            if unknown:
                raise ValueError(f"unknown metrics {unknown}; available: {available}")
            default_name = "metrics.png"
        if not chosen:
            raise ValueError(f"nothing to plot in {workdir}")
        panels = []
        for k in chosen:
            steps, vals = _series(records, k)
            panels.append(dict(kind="line", key=k, title=k, steps=steps, vals=vals,
                               ylabel=UNITS.get(k, k)))
    ncols = len(panels) if len(panels) <= 3 else 2 if len(panels) == 4 else 3
    nrows = math.ceil(len(panels) / ncols)
    extra = 0.4 if note else 0.0
    fig = _figure(4.0 * ncols, 3.0 * nrows + extra)
    for i, p in enumerate(panels):
        _draw_panel(fig.add_subplot(nrows, ncols, i + 1), p)
    if note:
        import textwrap

        fig.text(0.01, 0.005, "\n".join(textwrap.wrap(note, 40 * ncols)), fontsize=7,
                 va="bottom")
    fig.tight_layout(rect=(0, extra / (3.0 * nrows + extra), 1, 1))
    return fig, default_name


def plot_histogram(
    counts: Union[Sequence[float], Mapping[str, Sequence[float]]],
    labels: Sequence[str],
    out: str,
    title: str = "",
    normalize: bool = False,
    ylabel: Optional[str] = None,
    xlabel: str = "",
) -> str:
    """Categorical histogram PNG; a mapping ``{series: counts}`` gives side-by-side bars.

    E.g. ``plot_histogram({"before": c0, "after": c1}, [str(i) for i in range(100)], "h.png")``.
    ``normalize`` divides each series by its total. ``ylabel`` says what the bars are
    (default: "count", or "fraction" with ``normalize``); pass it when the values given are
    already fractions. Returns ``out``.
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
    fig = _figure(min(16.0, max(6.0, 0.12 * len(labels) * n + 2.0)), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, arr) in enumerate(arrays.items()):
        ax.bar(x + (i - (n - 1) / 2) * width, arr, width=width, label=name or None)
    step = max(1, len(labels) // 40)
    ax.set_xticks(x[::step])
    ax.set_xticklabels(labels[::step], rotation=90 if len(labels) > 10 else 0, fontsize=8)
    ax.set_ylabel(ylabel if ylabel is not None else "fraction" if normalize else "count")
    if xlabel:
        ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title)
    if n > 1 or next(iter(arrays)):
        ax.legend()
    fig.tight_layout()
    out = os.fspath(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, format="png")
    return out
