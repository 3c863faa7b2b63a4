"""Hyper-parameter sweeps: expand a grid into runs, run them, and summarize the results.

A sweep spec is a JSON file or a Python file (``get_sweep()`` returning a dict, or a module-level
``SWEEP`` dict)::

    {"name": "continuation_temperature",          # optional (default: the file's stem)
     "config": "configs/continuation.py",          # the base config, relative to the cwd
     "grid": {"reward.temp_end": [0.8, 0.85]},     # config key -> values (cartesian product)
     "fixed": {"train.steps": 750},                # optional: overrides shared by every run
     "metric": "after.mean_log_r",                 # optional: default metric of the plot
     "root": "runs/sweeps/continuation_temperature"}  # optional: default root directory

Each grid point is one run, ``ROOT/NAME``, whose name is built from its grid values
(``reward.temp_end=0.8, train.steps=100`` -> ``temp_end-0.8_steps-100``; filesystem-safe, and
unique within the sweep). Commands (``python -m gfn_jax.sweep`` or ``gfn-jax sweep``)::

    expand  SPEC [--root DIR] [--json]        list the runs and their overrides
    run     SPEC [--root DIR] [--dry-run] [--only NAME ...] [--stop-on-error]
            [-- extra gfn-jax train args]     run them here, one after another (finished runs
                                              are skipped; unfinished ones resume)
    emit    SPEC --launcher tpu|slurm [--launcher-args "..."] [--root DIR]
                                              print one launch/tpu.sh or sbatch launch/slurm.sh
                                              command per run ({name}, {index} are filled in)
    summary ROOT [--metric M] [--x KEY]       collect every run's final metrics into
                                              ROOT/summary.csv, ROOT/summary.md and a plot
    status  WORKDIR                           exit 0 if the run is finished, 1 if not
                                              (the launch scripts run this file directly,
                                              ``python gfn_jax/sweep.py status WORKDIR``,
                                              which imports no JAX)

A run is *finished* when its workdir holds a ``DONE`` file, or a ``summary.json`` written by
``gfn-jax train`` at its end (``"complete": true``; in older summaries: an ``eval`` entry and no
``preempted_at``) whose ``steps`` equals ``train.steps`` in the run's ``config.json``.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:
    # run as a plain file (``python gfn_jax/sweep.py status WORKDIR``, as the launch scripts
    # do, so the check needs neither the package's heavy imports nor an install): keep the
    # package's own directory off the import path so its modules cannot shadow the stdlib's
    import os as _os

    _here = _os.path.dirname(_os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if _os.path.abspath(p or ".") != _here]

import argparse
import csv
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "Run",
    "Sweep",
    "load_sweep",
    "expand",
    "run_name",
    "train_command",
    "launch_command",
    "run_local",
    "run_status",
    "collect",
    "summarize",
    "main",
]

SWEEP_FILE = "sweep.json"
DONE_FILE = "DONE"
_SAFE = re.compile(r"[^A-Za-z0-9._+=-]+")
_MAX_NAME = 120


# ---------------------------------------------------------------------------
# spec
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class Sweep:
    name: str
    config: str
    grid: Dict[str, List[Any]]
    fixed: Dict[str, Any] = dataclasses.field(default_factory=dict)
    metric: Optional[str] = None
    root: Optional[str] = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], default_name: str = "sweep") -> "Sweep":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown sweep spec keys: {sorted(unknown)} (allowed: name, config, "
                             "grid, fixed, metric, root)")
        if not d.get("config"):
            raise ValueError("a sweep spec needs 'config' (the base config file)")
        grid = d.get("grid")
        if not isinstance(grid, Mapping) or not grid:
            raise ValueError("a sweep spec needs a non-empty 'grid': {config key: [values]}")
        clean: Dict[str, List[Any]] = {}
        for k, vs in grid.items():
            key = _strip_key(k)
            if isinstance(vs, (str, bytes)) or not isinstance(vs, Sequence) or not vs:
                raise ValueError(f"grid[{k!r}] must be a non-empty list of values, got {vs!r}")
            if len({json.dumps(v, sort_keys=True) for v in vs}) != len(vs):
                raise ValueError(f"grid[{k!r}] repeats a value: {list(vs)!r}")
            clean[key] = list(vs)
        fixed = {_strip_key(k): v for k, v in dict(d.get("fixed") or {}).items()}
        both = sorted(set(fixed) & set(clean))
        if both:
            raise ValueError(f"keys both fixed and swept: {both}")
        return cls(name=str(d.get("name") or default_name), config=str(d["config"]), grid=clean,
                   fixed=fixed, metric=d.get("metric"), root=d.get("root"))

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _strip_key(k: str) -> str:
    k = str(k).strip()
    if k.startswith("--"):
        k = k[2:]
    if k.startswith("config."):
        k = k[len("config."):]
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", k):
        raise ValueError(f"bad config key {k!r} (expected dotted names like reward.temp_end)")
    return k


def load_sweep(path: str) -> Sweep:
    """A :class:`Sweep` from a ``.json`` or ``.py`` spec file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sweep spec not found: {path!r}")
    stem = os.path.splitext(os.path.basename(path))[0]
    if path.endswith(".json"):
        with open(path) as f:
            d = json.load(f)
    elif path.endswith(".py"):
        spec = importlib.util.spec_from_file_location(f"_gfn_jax_sweep_{stem}", path)
        mod = importlib.util.module_from_spec(spec)
        assert spec.loader is not None
        spec.loader.exec_module(mod)
        if hasattr(mod, "get_sweep"):
            d = mod.get_sweep()
        elif hasattr(mod, "SWEEP"):
            d = mod.SWEEP
        else:
            raise ValueError(f"{path}: define get_sweep() or SWEEP")
    else:
        raise ValueError(f"sweep spec must be a .json or .py file, got {path!r}")
    return Sweep.from_dict(d, default_name=stem)


def check_keys(sweep: Sweep) -> None:
    """Raise if a swept or fixed key is not in the base config (catches typos before any run
    starts)."""
    if not os.path.isfile(sweep.config):
        raise FileNotFoundError(f"base config not found: {sweep.config!r} (relative to the "
                                f"current directory {os.getcwd()!r})")
    spec = importlib.util.spec_from_file_location("_gfn_jax_sweep_base", sweep.config)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    for key in list(sweep.grid) + list(sweep.fixed):
        node = cfg
        for part in key.split("."):
            try:
                node = node[part]
            except (KeyError, TypeError, AttributeError):
                raise ValueError(f"{key!r} is not a key of {sweep.config} (see "
                                 "gfn_jax/defaults.py)") from None


# ---------------------------------------------------------------------------
# expansion
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    index: int
    name: str
    workdir: str
    values: Dict[str, Any]  # the grid values of this run
    overrides: Dict[str, Any]  # fixed + grid values, in that order


def _short_keys(keys: Sequence[str]) -> Dict[str, str]:
    """The last component of each key, or the whole key where last components collide."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _token(v: Any) -> str:
    if isinstance(v, bool):
        s = "true" if v else "false"
    elif isinstance(v, float):
        s = repr(v)
    elif isinstance(v, (list, tuple)):
        s = "+".join(_token(x) for x in v) or "empty"
    elif v is None:
        s = "none"
    else:
        s = str(v)
    s = _SAFE.sub("_", s).strip("_")
    return s or "_"


def run_name(values: Mapping[str, Any], keys: Optional[Sequence[str]] = None) -> str:
    """``temp_end-0.8_steps-100`` for ``{"reward.temp_end": 0.8, "train.steps": 100}``.
    ``keys``: all the swept keys (to shorten names consistently)."""
    keys = list(keys if keys is not None else values)
    short = _short_keys(keys)
    name = "_".join(f"{_SAFE.sub('_', short[k])}-{_token(values[k])}" for k in keys if k in values)
    if name.startswith((".", "-")):
        name = "r" + name
    return name


def _digest(v: Any) -> str:
    return hashlib.sha1(json.dumps(v, sort_keys=True, default=repr).encode()).hexdigest()[:8]


def expand(sweep: Sweep, root: Optional[str] = None) -> List[Run]:
    """One :class:`Run` per grid point (cartesian product, keys in spec order, the last key
    varying fastest), with unique filesystem-safe names under ``root``."""
    root = root or sweep.root or os.path.join("runs", "sweeps", sweep.name)
    keys = list(sweep.grid)
    points = [dict(zip(keys, combo)) for combo in itertools.product(*(sweep.grid[k] for k in keys))]
    plain = [run_name(p, keys) for p in points]
    names = [n[: _MAX_NAME - 9] + "-" + _digest(p)  # too long, or collided after sanitizing
             if len(n) > _MAX_NAME or plain.count(n) > 1 else n for n, p in zip(plain, points)]
    if len(set(names)) != len(names):  # pragma: no cover - digests of distinct points
        raise ValueError(f"run names are not unique: {names}")
    return [Run(i, n, _join(root, n), p, {**sweep.fixed, **p})
            for i, (n, p) in enumerate(zip(names, points))]


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name if "://" in root else os.path.join(root, name)


# ---------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------
def format_value(v: Any) -> str:
    """A value as ``--config.key=VALUE`` text that ml_collections parses back."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return repr(tuple(v))
    if v is None:
        return "None"
    return str(v) if isinstance(v, str) else repr(v)


def override_args(overrides: Mapping[str, Any]) -> List[str]:
    return [f"--config.{k}={format_value(v)}" for k, v in overrides.items()]


def train_args(sweep: Sweep, run: Run) -> List[str]:
    """The ``gfn-jax train`` arguments of one run."""
    return ["--config", sweep.config, "--workdir", run.workdir] + override_args(run.overrides)


def train_command(sweep: Sweep, run: Run, train_cmd: Optional[Sequence[str]] = None,
                  extra: Sequence[str] = ()) -> List[str]:
    """argv of the local training process (default: this Python's ``-m gfn_jax.cli train
    --noprogress``, i.e. ``gfn-jax train`` without relying on PATH or a progress bar in the
    log)."""
    base = (list(train_cmd) if train_cmd else
            [sys.executable, "-m", "gfn_jax.cli", "train", "--noprogress"])
    return base + train_args(sweep, run) + list(extra)


def launch_command(sweep: Sweep, run: Run, launcher: str, launcher_args: str = "") -> List[str]:
    """argv that launches one run on a cluster: ``launch/tpu.sh ARGS -- TRAIN_ARGS`` or
    ``sbatch --job-name=... ARGS launch/slurm.sh TRAIN_ARGS``. ``{name}`` and ``{index}`` in
    ``launcher_args`` become the run's name and index (e.g. one TPU per run)."""
    extra = shlex.split(launcher_args.replace("{name}", run.name)
                        .replace("{index}", str(run.index)))
    if launcher == "tpu":
        return ["launch/tpu.sh"] + extra + ["--"] + train_args(sweep, run)
    if launcher == "slurm":
        job = f"--job-name={sweep.name}-{run.name}"
        return ["sbatch", job] + extra + ["launch/slurm.sh"] + train_args(sweep, run)
    raise ValueError(f"unknown launcher {launcher!r}: choose tpu or slurm")


def _quote(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


# ---------------------------------------------------------------------------
# run status
# ---------------------------------------------------------------------------
def _read_text(path: str) -> Optional[str]:
    """A small file's text, local or (through etils.epath, which orbax brings) gs:// etc.;
    None if it does not exist."""
    if "://" in path:
        from etils import epath

        p = epath.Path(path)
        return p.read_text() if p.exists() else None
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read()


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    text = _read_text(path)
    if text is None:
        return None
    try:
        d = json.loads(text)
    except ValueError:
        return None
    return d if isinstance(d, dict) else None


def run_status(workdir: str) -> str:
    """``"done"``, ``"incomplete"`` (started: config.json or checkpoints exist) or
    ``"missing"``; see the module docstring for what "done" means."""
    join = (lambda n: workdir.rstrip("/") + "/" + n) if "://" in workdir else (
        lambda n: os.path.join(workdir, n))
    if _read_text(join(DONE_FILE)) is not None:
        return "done"
    config = _read_json(join("config.json"))
    summary = _read_json(join("summary.json"))
    if summary is not None and config is not None:
        want = (config.get("train") or {}).get("steps")
        # `gfn-jax train` marks its final summary "complete" (false when preempted); older
        # summaries are final when they hold the evaluation ("eval") and no preemption
        final = (summary["complete"] is True if "complete" in summary else
                 "eval" in summary and "preempted_at" not in summary)
        if final and want is not None and summary.get("steps") == want:
            return "done"
    if config is not None or summary is not None:
        return "incomplete"
    return "missing"


# ---------------------------------------------------------------------------
# local runs
# ---------------------------------------------------------------------------
def write_manifest(sweep: Sweep, runs: Sequence[Run], root: str) -> str:
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, SWEEP_FILE)
    with open(path, "w") as f:
        json.dump({"sweep": sweep.to_dict(), "root": root,
                   "runs": [dataclasses.asdict(r) for r in runs]}, f, indent=2)
    return path


def run_local(sweep: Sweep, runs: Sequence[Run], root: str,
              train_cmd: Optional[Sequence[str]] = None, extra: Sequence[str] = (),
              dry_run: bool = False, stop_on_error: bool = False,
              out=None) -> Dict[str, Any]:
    """Train the runs one after another (each a subprocess; its output goes to
    ``WORKDIR/train.log``). Finished runs are skipped; unfinished ones resume from their last
    checkpoint. Returns {run name: return code, or "skipped"}."""
    out = out or sys.stdout
    results: Dict[str, Any] = {}
    if not dry_run:
        write_manifest(sweep, runs, root)
    for pos, run in enumerate(runs):
        argv = train_command(sweep, run, train_cmd, extra)
        tag = f"[{pos + 1}/{len(runs)}]"  # position among the runs chosen (--only)
        if dry_run:
            print(_quote(argv), file=out)
            continue
        if run_status(run.workdir) == "done":
            print(f"{tag} {run.name}: finished, skipped", file=out)
            results[run.name] = "skipped"
            continue
        os.makedirs(run.workdir, exist_ok=True)
        log_path = os.path.join(run.workdir, "train.log")
        print(f"{tag} {run.name}: {_quote(argv)}", file=out, flush=True)
        t0 = time.time()
        with open(log_path, "a") as log:
            rc = subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT)
        results[run.name] = rc
        state = "ok" if rc == 0 else f"FAILED (exit {rc}; see {log_path})"
        print(f"    {state} in {time.time() - t0:.1f} s", file=out, flush=True)
        if rc != 0 and stop_on_error:
            break
    return results


# ---------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------
def _flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _number(v: Any) -> Optional[float]:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if v is None:
        return math.nan  # metrics files write NaN as null
    if v in ("inf", "-inf"):
        return float(v)
    return None


def _numeric(d: Mapping[str, Any], prefix: str) -> Dict[str, float]:
    out = {}
    for k, v in _flatten(d).items():
        x = _number(v)
        if x is not None:
            out[prefix + k] = x
    return out


def _last_metrics(workdir: str) -> Tuple[Optional[int], Dict[str, Any]]:
    path = os.path.join(workdir, "metrics.jsonl")
    last: Optional[Dict[str, Any]] = None
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                    last = rec
    if last is None:
        return None, {}
    return last["step"], {k: v for k, v in last.items() if k not in ("step", "time")}


def _runs_under(root: str) -> Tuple[List[Dict[str, Any]], List[str]]:
    """(runs as {name, workdir}, swept keys) from ROOT/sweep.json, else every sub-directory
    holding a config.json (swept keys: those whose values differ)."""
    manifest = _read_json(os.path.join(root, SWEEP_FILE))
    if manifest and manifest.get("runs"):
        runs = [{"name": r["name"], "workdir": os.path.join(root, r["name"])}
                for r in manifest["runs"]]
        return runs, list(manifest["sweep"]["grid"])
    runs = [{"name": n, "workdir": os.path.join(root, n)} for n in sorted(os.listdir(root))
            if os.path.isfile(os.path.join(root, n, "config.json"))]
    configs = [_flatten(_read_json(os.path.join(r["workdir"], "config.json")) or {}) for r in runs]
    keys = sorted({k for c in configs for k in c})
    swept = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1
             and not k.startswith("mesh.")]
    return runs, swept


def collect(root: str) -> Tuple[List[Dict[str, Any]], List[str]]:
    """One row per run under ``root``: name, swept keys (read back from each run's
    config.json), status, steps, wall time, and the final metrics -- ``final.*`` (the last
    train step's metrics from summary.json, else from metrics.jsonl), ``after.*`` and
    ``before.*`` (eval_after.json / eval_before.json). Returns (rows, swept keys)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"sweep root not found: {root!r}")
    runs, swept = _runs_under(root)
    if not runs:
        raise ValueError(f"no runs under {root!r} (no {SWEEP_FILE}, no sub-directory with a "
                         "config.json)")
    rows = []
    for r in runs:
        wd = r["workdir"]
        config = _flatten(_read_json(os.path.join(wd, "config.json")) or {})
        row: Dict[str, Any] = {"name": r["name"]}
        for k in swept:
            v = config.get(k)
            row[k] = tuple(v) if isinstance(v, list) else v
        row["status"] = run_status(wd)
        summary = _read_json(os.path.join(wd, "summary.json")) or {}
        step, last = _last_metrics(wd)
        row["steps"] = summary.get("steps", None if step is None else step + 1)
        for k in ("wall_time_s", "tokens_per_s"):
            if k in summary:
                row[k] = summary[k]
        row.update(_numeric(summary.get("final_metrics") or last, "final."))
        for tag in ("after", "before"):
            ev = _read_json(os.path.join(wd, f"eval_{tag}.json"))
            if ev is None:
                ev = (summary.get("eval") or {}).get(tag)
            if ev:
                row.update(_numeric(ev, f"{tag}."))
        rows.append(row)
    return rows, swept


def _columns(rows: Sequence[Mapping[str, Any]], swept: Sequence[str]) -> List[str]:
    head = ["name"] + list(swept) + ["status", "steps", "wall_time_s", "tokens_per_s"]
    rest = sorted({k for r in rows for k in r} - set(head),
                  key=lambda k: ({"after": 0, "before": 1, "final": 2}.get(k.split(".")[0], 3), k))
    return [c for c in head if any(c in r for r in rows)] + rest


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def summarize(root: str, metric: Optional[str] = None, x: Optional[str] = None,
              plot: bool = True) -> Dict[str, Any]:
    """Write ``ROOT/summary.csv`` and ``ROOT/summary.md`` (one row per run) and, with
    ``plot``, ``ROOT/summary_<metric>.png``: ``metric`` (default: the spec's ``metric``, else
    ``after.*`` / ``final.loss``) against the swept key ``x`` (default: the first), one line per
    combination of the other swept keys. Returns {"rows", "columns", "csv", "markdown",
    "plot"}."""
    rows, swept = collect(root)
    cols = _columns(rows, swept)
    csv_path = os.path.join(root, "summary.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow(["" if r.get(c) is None else r.get(c) for c in cols])
    md_path = os.path.join(root, "summary.md")
    with open(md_path, "w") as f:
        f.write(f"# Sweep summary: {os.path.abspath(root)}\n\n")
        f.write("| " + " | ".join(cols) + " |\n")
        f.write("|" + "|".join("---" for _ in cols) + "|\n")
        for r in rows:
            f.write("| " + " | ".join(_fmt(r.get(c)).replace("|", "\\|") for c in cols) + " |\n")
    result: Dict[str, Any] = {"rows": rows, "columns": cols, "csv": csv_path,
                              "markdown": md_path, "plot": None}
    if plot and swept:
        manifest = _read_json(os.path.join(root, SWEEP_FILE)) or {}
        metric = metric or (manifest.get("sweep") or {}).get("metric") or _default_metric(cols)
        if metric:
            result["plot"] = _plot(root, rows, swept, metric, x or swept[0])
            result["metric"] = metric
    return result


def _default_metric(cols: Sequence[str]) -> Optional[str]:
    for c in cols:
        if c.startswith("after."):
            return c
    return "final.loss" if "final.loss" in cols else None


def _plot(root: str, rows: Sequence[Mapping[str, Any]], swept: Sequence[str], metric: str,
          x: str) -> Optional[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if x not in swept:
        raise ValueError(f"--x {x!r} is not a swept key ({list(swept)})")
    others = [k for k in swept if k != x]
    xs_all = [r.get(x) for r in rows]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xs_all)
    cats = list(dict.fromkeys(map(str, xs_all)))
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    groups: Dict[Tuple, List[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in others), []).append(r)
    plotted = 0
    for g, members in groups.items():
        pts = [(r.get(x), r[metric]) for r in members
               if isinstance(r.get(metric), (int, float))]
        if not pts:
            continue
        if numeric:
            pts.sort(key=lambda p: p[0])
            xs = [p[0] for p in pts]
        else:
            xs = [cats.index(str(p[0])) for p in pts]
        label = ", ".join(f"{k}={v}" for k, v in zip(others, g)) or None
        ax.plot(xs, [p[1] for p in pts], marker="o", label=label)
        plotted += 1
    if not plotted:
        print(f"warning: no run has metric {metric!r}; no plot written", file=sys.stderr)
        return None
    if not numeric:
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels(cats)
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {x}")
    ax.grid(True, alpha=0.3)
    if others:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(root, f"summary_{_SAFE.sub('_', metric)}.png")
    fig.savefig(path)
    return path


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gfn-jax sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def spec_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("spec", help="sweep spec (.py or .json)")
        q.add_argument("--root", help="directory holding one workdir per run (default: the "
                       "spec's root, else runs/sweeps/NAME)")
        q.add_argument("--no-check", action="store_true",
                       help="do not check the keys against the base config")

    q = sub.add_parser("expand", help="list the runs")
    spec_args(q)
    q.add_argument("--json", action="store_true", help="print the runs as JSON")
    q = sub.add_parser("run", help="run locally, one after another")
    spec_args(q)
    q.add_argument("--dry-run", action="store_true", help="print the commands only")
    q.add_argument("--only", nargs="+", metavar="NAME", help="run only these runs")
    q.add_argument("--stop-on-error", action="store_true", help="stop at the first failed run")
    q.add_argument("--train-cmd", help='training command (default: "python -m gfn_jax.cli '
                   'train" with this Python), e.g. "gfn-jax train"')
    q.epilog = "Arguments after -- are passed to every gfn-jax train command."
    q = sub.add_parser("emit", help="print cluster launch commands (nothing is run)")
    spec_args(q)
    q.add_argument("--launcher", choices=("tpu", "slurm"), required=True)
    q.add_argument("--launcher-args", default="",
                   help='arguments for launch/tpu.sh or sbatch, e.g. "--tpu t-{index} --zone Z"')
    q = sub.add_parser("summary", help="collect final metrics into CSV, markdown and a plot")
    q.add_argument("root")
    q.add_argument("--metric", help="metric to plot (a column of summary.csv)")
    q.add_argument("--x", help="swept key on the x axis (default: the first)")
    q.add_argument("--no-plot", action="store_true")
    q = sub.add_parser("status", help="exit 0 iff the run in WORKDIR is finished")
    q.add_argument("workdir")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``gfn-jax sweep expand|run|emit|summary|status ...``; ``argv`` excludes the program and
    the word ``sweep`` (default: ``sys.argv[1:]``). Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if "--" in argv:  # everything after -- goes to gfn-jax train (run)
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = _parser().parse_args(argv)
    if extra and args.cmd != "run":
        print(f"error: arguments after -- are only for `run`: {extra}", file=sys.stderr)
        return 2
    try:
        if args.cmd == "status":
            status = run_status(args.workdir)
            print(status)
            return 0 if status == "done" else 1
        if args.cmd == "summary":
            res = summarize(args.root, metric=args.metric, x=args.x, plot=not args.no_plot)
            print(open(res["markdown"]).read(), end="")
            print(f"wrote {res['csv']}, {res['markdown']}"
                  + (f", {res['plot']}" if res["plot"] else ""))
            return 0
        sweep = load_sweep(args.spec)
        if not args.no_check:
            check_keys(sweep)
        root = args.root or sweep.root or os.path.join("runs", "sweeps", sweep.name)
        runs = expand(sweep, root)
        if args.cmd == "expand":
            if args.json:
                print(json.dumps([dataclasses.asdict(r) for r in runs], indent=2))
            else:
                for r in runs:
                    print(f"{r.name}\t{r.workdir}\t{_quote(override_args(r.overrides))}")
            return 0
        if args.cmd == "emit":
            for r in runs:
                print(_quote(launch_command(sweep, r, args.launcher, args.launcher_args)))
            return 0
        if args.cmd == "run":
            if args.only:
                unknown = sorted(set(args.only) - {r.name for r in runs})
                if unknown:
                    raise ValueError(f"--only: no such runs {unknown}")
                runs = [r for r in runs if r.name in args.only]
            train_cmd = shlex.split(args.train_cmd) if args.train_cmd else None
            res = run_local(sweep, runs, root, train_cmd=train_cmd, extra=extra,
                            dry_run=args.dry_run, stop_on_error=args.stop_on_error)
            failed = [n for n, rc in res.items() if rc not in (0, "skipped")]
            if failed:
                print(f"error: {len(failed)} run(s) failed: {failed}", file=sys.stderr)
                return 1
            return 0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
