"""The results report: read run directories, write markdown tables and the
likelihood-vs-diversity plot into one report file (``docs/results.md``).

A *run directory* is either

* a training run (``gfn-jax train``): ``config.json``, ``summary.json`` (wall time, steps,
  ``eval.before`` / ``eval.after``; optional ``command`` and ``hardware``), ``eval_*.json``,
  ``metrics.jsonl``; it gives one row per evaluation (``before`` = the base model / prompt,
  ``after`` = the tuned policy), labelled with its objective and final reward temperature;
* a baselines directory (``python -m gfn_jax.baselines``): ``baselines.json`` ({method:
  metrics}) and ``run.json`` (command, hardware, wall time, config); one row per method.

* an experiment-script output: ``scripts/arithmetic_experiment.py``'s directory
  (``eval_<method>.json``, ``wall_times.json``), ``scripts/subj_em.py``'s ``results.json``
  (one per k: its rows are merged with the other k's into one table), or
  ``scripts/toy_objectives.py``'s ``toy_objectives.json``; an optional ``experiment.json``
  beside them gives the command and hardware.

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
           "write_report", "write_sectioned_report", "write_experiment_meta", "main"]

COLUMNS: Dict[str, Tuple[str, ...]] = {
    "continuation": ("logp_mean", "logp_max", "embedding_diversity", "word_distinct_2",
                     "distinct_2", "unique_fraction", "mean_length"),
    "infill_stories": ("bleu4", "gleu", "embedding_diversity", "logp_mean",
                       "word_distinct_2", "mean_length"),
    "infill": ("label_accuracy", "mean_log_p_base", "distinct_2", "mean_length"),
    "arithmetic": ("id_accuracy", "id_sample_accuracy", "ood_accuracy", "ood_sample_accuracy",
                   "parsed_fraction", "log_z_iw", "ess_fraction", "train_wall_s"),
    "rng": ("fraction_valid", "tv_to_uniform", "tv_to_uniform_among_valid", "distinct_valid",
            "num_samples"),
    "toy_objectives": ("target", "tv", "tv_to_reward_target", "mass_on_mode", "steps",
                       "train_wall_s"),
    "subj": ("accuracy_k10", "accuracy_k20", "accuracy_k50"),
}
"""Headline metrics per task, in table order."""

SCATTER: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "continuation": ("logp_mean", ("embedding_diversity", "word_distinct_2")),
    "infill_stories": ("logp_mean", ("embedding_diversity", "word_distinct_2")),
}
"""Per task: (likelihood metric on y, diversity metrics on x, first present wins)."""

NOT_RECORDED = "not recorded"
TABLES_MARK = "<!-- tables -->"
"""In a section's notes file: the generated tables go here."""


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


def _meta(d: str) -> Dict[str, Any]:
    m = _json(os.path.join(d, "experiment.json"))
    return m if isinstance(m, dict) else {}


def _experiment(d: str, task: str, rows: Dict[str, Dict[str, Any]], meta: Dict[str, Any],
                wall: Optional[float]) -> Dict[str, Any]:
    return {"kind": "experiment", "dir": d, "config": {}, "task": task,
            "command": meta.get("command") or NOT_RECORDED,
            "hardware": meta.get("hardware") or NOT_RECORDED,
            "wall_time_s": wall, "evals": rows, "last_metrics": {}, "meta": meta}


ARITH_LABELS = {"few_shot": "few-shot prompting", "sft": "SFT", "ppo": "PPO",
                "gfn": "GFlowNet (subtb)"}
SUBJ_LABELS = (("zero_shot", "zero-shot prompting"), ("few_shot", "few-shot prompting"),
               ("supervised_lora", "supervised LoRA classifier"))
SUBJ_EM = (("greedy_accuracy", "greedy rationale"), ("vote_accuracy", "majority vote"),
           ("mean_prob_accuracy", "mean label probability"))


def _read_arithmetic(d: str) -> Dict[str, Any]:
    times = _json(os.path.join(d, "wall_times.json")) or {}
    rows: Dict[str, Dict[str, Any]] = {}
    for key, label in ARITH_LABELS.items():
        m = _json(os.path.join(d, f"eval_{key}.json"))
        if not isinstance(m, dict):
            continue
        m = {k: v for k, v in m.items() if isinstance(v, (int, float))}
        if "id_parsed_fraction" in m and "ood_parsed_fraction" in m:
            m["parsed_fraction"] = (m["id_parsed_fraction"] + m["ood_parsed_fraction"]) / 2
        if f"train_{key}" in times:
            m["train_wall_s"] = times[f"train_{key}"]
        rows[label] = m
    wall = sum(v for v in times.values() if isinstance(v, (int, float))) or None
    return _experiment(d, "arithmetic", rows, _meta(d), wall)


def _read_subj(path: str, res: Dict[str, Any]) -> Dict[str, Any]:
    k = res["k"]
    col = f"accuracy_k{k}"
    rows: Dict[str, Dict[str, Any]] = {}
    for key, label in SUBJ_LABELS:
        v = (res.get("baselines") or {}).get(key)
        if isinstance(v, (int, float)):
            rows[label] = {col: v}
    for rnd in res.get("rounds") or []:
        for part, name in (("em", "E/M"), ("e_only", "E-step only")):
            m = rnd.get(part) or {}
            for key, how in SUBJ_EM:
                if isinstance(m.get(key), (int, float)):
                    rows[f"{name} round {rnd.get('round', 0)}, {how}"] = {col: m[key]}
    times = res.get("times_s") or {}
    wall = sum(v for v in times.values() if isinstance(v, (int, float))) or None
    return _experiment(os.path.dirname(path) or ".", "subj", rows, _meta(os.path.dirname(path)),
                       wall)


def _read_toy(path: str, res: Dict[str, Any]) -> Dict[str, Any]:
    meta = dict(res.get("meta") or {})
    hw = meta.get("hardware") or (f"{meta.get('cpus', '?')} CPU cores ({meta.get('machine', '?')})"
                                  if meta else None)
    rows = {r["setting"]: {k: v for k, v in r.items() if k != "setting"}
            for r in res.get("results") or [] if isinstance(r, dict) and "setting" in r}
    wall = sum(r.get("train_wall_s", 0.0) for r in rows.values()) or None
    return _experiment(path, "toy_objectives", rows, {"command": meta.get("command"),
                                                       "hardware": hw}, wall)


def write_experiment_meta(directory: str, argv: Optional[Sequence[str]] = None) -> str:
    """Record how an experiment script was run: ``DIR/experiment.json`` with the command
    (``python`` + ``argv``, default ``sys.argv``) and the hardware; read back by the report."""
    import shlex

    from gfn_jax.baselines import hardware

    args = list(sys.argv if argv is None else argv)
    meta = {"command": shlex.join(["python"] + args), "hardware": hardware()}
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "experiment.json")
    with open(path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def read_run(path: str) -> Dict[str, Any]:
    """What a run directory holds: ``kind`` ("train" | "baselines"), ``dir``, ``config``,
    ``task``, ``command``, ``hardware``, ``wall_time_s``, ``evals`` ({tag: metrics}),
    ``last_metrics`` (last logged value of each training metric). ``ValueError`` if the
    directory is neither kind."""
    d = os.path.normpath(path)
    if os.path.isfile(d):
        res = _json(d)
        if isinstance(res, dict) and "k" in res and "rounds" in res:
            return _read_subj(d, res)
        if isinstance(res, dict) and "results" in res and "meta" in res:
            return _read_toy(d, res)
        raise ValueError(f"{d!r}: not a results file this report knows (subj_em.py's "
                         f"results.json or toy_objectives.py's JSON)")
    if os.path.isfile(os.path.join(d, "results.json")) and not os.path.isfile(
            os.path.join(d, "config.json")):
        return read_run(os.path.join(d, "results.json"))
    if os.path.isfile(os.path.join(d, "wall_times.json")) and glob.glob(
            os.path.join(d, "eval_*.json")):
        return _read_arithmetic(d)
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
    if run["kind"] in ("baselines", "experiment"):
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
            rows = out.setdefault(r["task"], [])
            same = next((x for x in rows if x["method"] == method and x["temp_end"] == t_end
                         and not set(x["metrics"]) & set(m)), None)
            if same is not None and r["kind"] == "experiment":
                # the same method measured in another run under other columns (SUBJ per k)
                same["metrics"] = {**same["metrics"], **m}
                same["run"] = f"{same['run']}`, `{r['dir']}"
                continue
            rows.append({"task": r["task"], "method": method, "temp_end": t_end,
                         "run": r["dir"], "tag": tag, "metrics": m})
    for task, rows in out.items():
        # the base model is evaluated before every run (same model, prompts and seed): once
        firsts = [x for x in rows if x["tag"] == "before"][:1]
        rows = [x for x in rows if x["tag"] != "before" or x in firsts]
        # one label from two runs (e.g. two learning rates): name the runs
        labels = [x["method"] for x in rows]
        runs_of = {m: [x["run"] for x in rows if x["method"] == m] for m in set(labels)}
        for row in rows:
            same = runs_of[row["method"]]
            if len(same) > 1:
                parts = os.path.normpath(row["run"]).split(os.sep)
                # the shortest path tail that tells this run from its twins
                for n in range(1, len(parts) + 1):
                    tail = os.sep.join(parts[-n:])
                    if sum(os.path.normpath(r).endswith(tail) for r in same) == 1:
                        break
                row["method"] = f"{row['method']} [{tail}]"
        out[task] = rows
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
        cells.append(f"`{r['run']}`" + ("" if r["tag"] == r["method"] else f" ({r['tag']})"))
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
    placed: List[Tuple[float, float]] = []
    xr = (max(p[1] for p in pts) - min(p[1] for p in pts)) or 1.0
    yr = (max(p[2] for p in pts) - min(p[2] for p in pts)) or 1.0
    for r, x, y in pts:
        gfn = r["temp_end"] is not None
        ax.scatter([x], [y], marker="*" if gfn else "o", s=120 if gfn else 50)
        # labels of near-coincident points are stacked instead of printed over each other
        near = sum(abs(x - px) < 0.04 * xr and abs(y - py) < 0.04 * yr for px, py in placed)
        placed.append((x, y))
        ax.annotate(r["method"], (x, y), textcoords="offset points",
                    xytext=(5, 4 + 10 * near), fontsize=7)
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


def _finish(parts: List[str], runs: Sequence[Dict[str, Any]], out: str) -> str:
    """Append the Runs table and write the report atomically (temp file + rename)."""
    text = "\n".join(parts + ["## Runs", "", _runs_table(runs), ""])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, out)
    return text


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
        parts += _task_block(by_task[task], task, out_dir, plot_dir, f"## {task}")
    return _finish(parts, runs, out)


def _task_block(rows: List[Dict[str, Any]], task: str, out_dir: str, plot_dir: str,
                heading: str) -> List[str]:
    parts = [heading, ""]
    cols = COLUMNS.get(task)
    if cols is not None:  # the task's headline metrics that these rows have (else all)
        cols = [c for c in cols if any(c in r["metrics"] for r in rows)] or None
    parts += [markdown_table(rows, cols), ""]
    png = scatter_plot(rows, task, os.path.join(plot_dir, f"{task}_likelihood_diversity.png"))
    if png:
        rel = os.path.relpath(png, out_dir)
        parts += [f"![{task}: likelihood vs diversity]({rel})", ""]
    return parts


def _expand(patterns: Sequence[str], base: str = "") -> List[str]:
    out: List[str] = []
    for pat in patterns:
        pat = os.path.join(base, pat) if base and not os.path.isabs(pat) else pat
        hits = sorted(glob.glob(pat))
        out += hits or [pat]
    return out


def write_sectioned_report(spec_path: str, out: str) -> str:
    """The report laid out by a sections file (JSON): ``{"title": ..., "intro": "notes.md",
    "sections": [{"title": ..., "notes": "file.md", "runs": ["dir or glob", ...]}, ...]}``.
    Each section prints its notes (the prose: findings, deviations) and one table (and
    scatter plot) per task of its runs, at the notes' ``<!-- tables -->`` line (else after
    them). Paths are relative to the working directory; a
    missing run is an error naming the section, so every number has a source."""
    spec = _json(spec_path)
    if not isinstance(spec, dict) or not isinstance(spec.get("sections"), list):
        raise ValueError(f"{spec_path}: not a sections file (a JSON object with a 'sections' "
                         f"list)")
    out_dir = os.path.dirname(os.path.abspath(out))
    plot_dir = os.path.join(out_dir, os.path.splitext(os.path.basename(out))[0] + "_plots")

    def read_notes(name: Optional[str]) -> str:
        if not name:
            return ""
        with open(name) as f:
            return f.read().rstrip()

    parts = [f"# {spec.get('title', 'Results')}", "",
             f"Generated by `gfn-jax report --sections {spec_path} --out {out}` from the run "
             "directories named in each table row (run directories are not committed; each "
             "section's notes give the commands that make them, the Runs table their "
             "recorded command, hardware and wall time).", ""]
    intro = read_notes(spec.get("intro"))
    if intro:
        parts += [intro, ""]
    all_runs: List[Dict[str, Any]] = []
    for i, sec in enumerate(spec["sections"]):
        title = sec.get("title") or f"section {i + 1}"
        parts += [f"## {title}", ""]
        notes = read_notes(sec.get("notes"))
        before, _, after = notes.partition(TABLES_MARK)
        if before.strip():
            parts += [before.strip(), ""]
        runs = []
        for d in _expand(sec.get("runs") or []):
            if not os.path.exists(d):
                raise ValueError(f"section {title!r}: run {d!r} does not exist (make it with "
                                 f"the command in {sec.get('notes') or 'its notes'})")
            runs.append(read_run(d))
        all_runs += runs
        by_task = collect_rows(runs)
        for task in sorted(by_task):
            heading = f"### Table: {task}" if len(by_task) > 1 else "### Table"
            parts += _task_block(by_task[task], task, out_dir, plot_dir, heading)
        if after.strip():
            parts += [after.strip(), ""]
    return _finish(parts, all_runs, out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``gfn-jax report RUN_DIR ... --out FILE``: exit 0, or 2 with a one-line error."""
    p = argparse.ArgumentParser(prog="gfn-jax report", description=(
        "Write markdown tables and likelihood-vs-diversity plots from run directories "
        "(training runs and `python -m gfn_jax.baselines` outputs)."))
    p.add_argument("runs", nargs="*", help="run directories (globs are expanded)")
    p.add_argument("--sections", default="", help=(
        "a sections file (JSON): titled sections, each with a notes file and its runs "
        "(see write_sectioned_report); replaces the positional run directories"))
    p.add_argument("--out", default="docs/results.md", help="the report file to write")
    p.add_argument("--title", default="Results")
    p.add_argument("--notes", default="", help="a markdown file inserted under the title")
    a = p.parse_args(list(argv) if argv is not None else None)
    if a.sections:
        try:
            write_sectioned_report(a.sections, a.out)
        except (OSError, ValueError, KeyError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {a.out} (sections from {a.sections})")
        return 0
    if not a.runs:
        p.error("give run directories or --sections FILE")
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
