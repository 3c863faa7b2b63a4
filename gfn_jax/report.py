"""The results report: read run directories, write markdown tables and the
likelihood-vs-diversity plot into one report file (``docs/results.md``).

A *run directory* is either

* a training run (``gfn-jax train``): ``config.json``, ``summary.json`` (wall time, steps,
  ``eval.before`` / ``eval.after``; optional ``command`` and ``hardware``), ``eval_*.json``,
  ``metrics.jsonl``; it gives one row per evaluation (``before`` = the base model / prompt,
  ``after`` = the tuned policy), labelled with its objective and final reward temperature;
* a baselines directory (``python -m gfn_jax.baselines``): ``baselines.json`` ({method:
  metrics}) and ``run.json`` (command, hardware, wall time, config); one row per method.

Every table row names its run directory; a "Runs" table gives each directory's command,
hardware and wall time ("not recorded" where the run did not write them). Rows are grouped by
task (``config.task.name``) and each task shows its headline metrics (:data:`COLUMNS`; a task
without an entry shows every numeric metric). The scatter plot (one per task that has both a
likelihood and a diversity metric) puts one point per method and per GFlowNet final
temperature.

    gfn-jax report runs/continuation runs/sweeps/continuation_temperature/* \\
        runs/baselines/continuation --out docs/results.md
    python -m gfn_jax.report RUN_DIR ... --out docs/results.md [--title T] [--notes FILE]
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["COLUMNS", "SCATTER", "read_run", "collect_rows", "markdown_table", "scatter_plot",
           "write_report", "main"]

COLUMNS: Dict[str, Tuple[str, ...]] = {
    "continuation": ("logp_mean", "logp_max", "embedding_diversity", "word_distinct_2",
                     "distinct_2", "unique_fraction", "mean_length"),
    "infill_stories": ("bleu4", "gleu", "embedding_diversity", "logp_mean",
                       "word_distinct_2", "mean_length"),
    "infill": ("label_accuracy", "mean_log_p_base", "distinct_2", "mean_length"),
}
"""Headline metrics per task, in table order."""

SCATTER: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "continuation": ("logp_mean", ("embedding_diversity", "word_distinct_2")),
    "infill_stories": ("logp_mean", ("embedding_diversity", "word_distinct_2")),
}
"""Per task: (likelihood metric on y, diversity metrics on x, first present wins)."""

NOT_RECORDED = "not recorded"


def _json(path: str) -> Optional[Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _last_metrics(path: str) -> Dict[str, float]:
    last: Dict[str, float] = {}
    try:
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    last.update({k: v for k, v in rec.items() if isinstance(v, (int, float))})
    except OSError:
        pass
    return last


def read_run(path: str) -> Dict[str, Any]:
    """What a run directory holds: ``kind`` ("train" | "baselines"), ``dir``, ``config``,
    ``task``, ``command``, ``hardware``, ``wall_time_s``, ``evals`` ({tag: metrics}),
    ``last_metrics`` (last logged value of each training metric). ``ValueError`` if the
    directory is neither kind."""
    d = os.path.normpath(path)
    base = _json(os.path.join(d, "baselines.json"))
    if base is not None:
        meta = _json(os.path.join(d, "run.json")) or {}
        cfg = meta.get("config") or {}
        return {"kind": "baselines", "dir": d, "config": cfg,
                "task": meta.get("task") or (cfg.get("task") or {}).get("name", "?"),
                "command": meta.get("command") or NOT_RECORDED,
                "hardware": meta.get("hardware") or NOT_RECORDED,
                "wall_time_s": meta.get("wall_time_s"), "evals": dict(base),
                "last_metrics": {}, "meta": meta}
    cfg = _json(os.path.join(d, "config.json"))
    summary = _json(os.path.join(d, "summary.json"))
    if cfg is None and summary is None:
        raise ValueError(f"{d!r} is not a run directory (no config.json / summary.json / "
                         f"baselines.json)")
    summary = summary or {}
    cfg = cfg or {}
    evals: Dict[str, Dict[str, float]] = {}
    for f in sorted(glob.glob(os.path.join(d, "eval_*.json"))):
        tag = os.path.basename(f)[len("eval_"):-len(".json")]
        m = _json(f)
        if isinstance(m, dict):
            evals[tag] = m
    for tag, m in (summary.get("eval") or {}).items():
        if isinstance(m, dict):
            evals.setdefault(tag, m)
    return {"kind": "train", "dir": d, "config": cfg,
            "task": (cfg.get("task") or {}).get("name", "?"),
            "command": summary.get("command") or NOT_RECORDED,
            "hardware": summary.get("hardware") or NOT_RECORDED,
            "wall_time_s": summary.get("wall_time_s"), "evals": evals,
            "last_metrics": _last_metrics(os.path.join(d, "metrics.jsonl")),
            "summary": summary}


def _label(run: Dict[str, Any], tag: str) -> Tuple[str, Optional[float]]:
    """(method label, final reward temperature or None) of one evaluation of a run."""
    if run["kind"] == "baselines":
        return tag, None
    cfg = run["config"]
    obj = (cfg.get("objective") or {}).get("name", "?")
    t_end = (cfg.get("reward") or {}).get("temp_end")
    if tag == "before":
        return "base model (sampling)", None
    if obj in ("subtb", "tb", "db"):
        return f"GFlowNet ({obj}, T_end={t_end})", t_end
    return f"{obj} ({tag})", None


def collect_rows(runs: Sequence[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    """Rows grouped by task: each ``{task, method, temp_end, run, tag, metrics}``."""
    out: Dict[str, List[Dict[str, Any]]] = {}
    for r in runs:
        for tag, m in r["evals"].items():
            method, t_end = _label(r, tag)
            out.setdefault(r["task"], []).append(
                {"task": r["task"], "method": method, "temp_end": t_end, "run": r["dir"],
                 "tag": tag, "metrics": m})
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "–" if v is None else str(v)
    if not math.isfinite(v):
        return str(v)
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.3g}"
    return f"{v:.4g}" if abs(v) < 100 else f"{v:.1f}"


def markdown_table(rows: Sequence[Dict[str, Any]], columns: Optional[Sequence[str]] = None
                   ) -> str:
    """A markdown table: method, each metric column, the run directory and evaluation tag."""
    if columns is None:
        seen: List[str] = []
        for r in rows:
            for k, v in r["metrics"].items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in seen:
                    seen.append(k)
        columns = seen
    head = ["method"] + list(columns) + ["run (evaluation)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"]] + [_fmt(r["metrics"].get(c)) for c in columns]
        cells.append(f"`{r['run']}` ({r['tag']})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _xy(rows, task):
    y_key, x_keys = SCATTER[task]
    x_key = next((k for k in x_keys if any(k in r["metrics"] for r in rows)), None)
    pts = [(r, r["metrics"].get(x_key), r["metrics"].get(y_key)) for r in rows] if x_key else []
    pts = [(r, x, y) for r, x, y in pts if isinstance(x, (int, float)) and
           isinstance(y, (int, float)) and math.isfinite(x) and math.isfinite(y)]
    return x_key, y_key, pts


def scatter_plot(rows: Sequence[Dict[str, Any]], task: str, path: str) -> Optional[str]:
    """The likelihood-vs-diversity scatter of ``task``'s rows (one point per method / final
    temperature) saved to ``path``; None when no row has both metrics."""
    if task not in SCATTER:
        return None
    x_key, y_key, pts = _xy(rows, task)
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r, x, y in pts:
        gfn = r["temp_end"] is not None
        ax.scatter([x], [y], marker="*" if gfn else "o", s=120 if gfn else 50)
        ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xlabel(f"{x_key} (higher = more diverse)")
    ax.set_ylabel(f"{y_key} (higher = more likely)")
    ax.set_title(f"{task}: likelihood vs diversity")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _runs_table(runs: Sequence[Dict[str, Any]]) -> str:
    lines = ["| run directory | task | command | hardware | wall time (s) |",
             "|---|---|---|---|---|"]
    for r in runs:
        wt = r["wall_time_s"]
        lines.append(f"| `{r['dir']}` | {r['task']} | `{r['command']}` | {r['hardware']} | "
                     f"{_fmt(wt) if wt is not None else NOT_RECORDED} |")
    return "\n".join(lines)


def write_report(run_dirs: Sequence[str], out: str, title: str = "Results",
                 notes: str = "") -> str:
    """Read ``run_dirs``, write the markdown report to ``out`` (plots beside it, in
    ``<out stem>_plots/``); returns the markdown text."""
    runs = [read_run(d) for d in run_dirs]
    by_task = collect_rows(runs)
    out_dir = os.path.dirname(os.path.abspath(out))
    plot_dir = os.path.join(out_dir, os.path.splitext(os.path.basename(out))[0] + "_plots")
    parts = [f"# {title}", "", "Generated by `gfn-jax report` from the run directories named "
             "in each row; the Runs table gives each one's command, hardware and wall time.",
             ""]
    if notes:
        parts += [notes.rstrip(), ""]
    for task in sorted(by_task):
        rows = by_task[task]
        parts += [f"## {task}", ""]
        cols = COLUMNS.get(task)
        if cols is not None:
            cols = [c for c in cols if any(c in r["metrics"] for r in rows)]
        parts += [markdown_table(rows, cols), ""]
        png = scatter_plot(rows, task, os.path.join(plot_dir, f"{task}_likelihood_diversity.png"))
        if png:
            rel = os.path.relpath(png, out_dir)
            parts += [f"![{task}: likelihood vs diversity]({rel})", ""]
    parts += ["## Runs", "", _runs_table(runs), ""]
    text = "\n".join(parts)
    os.makedirs(out_dir, exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, out)
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``gfn-jax report RUN_DIR ... --out FILE``: exit 0, or 2 with a one-line error."""
    p = argparse.ArgumentParser(prog="gfn-jax report", description=(
        "Write markdown tables and likelihood-vs-diversity plots from run directories "
        "(training runs and `python -m gfn_jax.baselines` outputs)."))
    p.add_argument("runs", nargs="+", help="run directories (globs are expanded)")
    p.add_argument("--out", default="docs/results.md", help="the report file to write")
    p.add_argument("--title", default="Results")
    p.add_argument("--notes", default="", help="a markdown file inserted under the title")
    a = p.parse_args(list(argv) if argv is not None else None)
    dirs: List[str] = []
    for pat in a.runs:
        hits = sorted(glob.glob(pat)) or [pat]
        dirs += [h for h in hits if os.path.isdir(h)] or [pat]
    try:
        notes = open(a.notes).read() if a.notes else ""
        write_report(dirs, a.out, a.title, notes)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out} ({len(dirs)} run directories)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
