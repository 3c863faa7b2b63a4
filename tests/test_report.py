"""gfn-jax report on fake run directories: rows name their run, the Runs table gives command,
hardware and wall time ("not recorded" when absent), per-task headline columns, the
likelihood-vs-diversity scatter, and one-line errors."""

import json
import os

import pytest

from gfn_jax import report


def _write(d, name, obj):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "w") as f:
        json.dump(obj, f)


def train_run(tmp_path, name, task, temp_end, after, before=None, objective="subtb",
              command=None):
    d = str(tmp_path / name)
    _write(d, "config.json", {"task": {"name": task}, "objective": {"name": objective},
                              "reward": {"temp_end": temp_end}})
    summary = {"wall_time_s": 123.4, "eval": {"after": after}}
    if command:
        summary.update(command=command, hardware="1 x H200")
    _write(d, "summary.json", summary)
    _write(d, "eval_after.json", after)
    if before is not None:
        _write(d, "eval_before.json", before)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 0, "loss": 2.0}) + "\n" + json.dumps({"step": 1, "loss": 1.5})
                + "\n")
    return d


def test_report_tables_plot_and_runs(tmp_path):
    g1 = train_run(tmp_path, "gfn_t08", "continuation", 0.8,
                   {"logp_mean": -21.5, "logp_max": -12.25, "embedding_diversity": 0.31,
                    "word_distinct_2": 0.9},
                   before={"logp_mean": -30.0, "embedding_diversity": 0.5},
                   command="gfn-jax train --config configs/continuation.py --workdir gfn_t08")
    g2 = train_run(tmp_path, "gfn_t095", "continuation", 0.95,
                   {"logp_mean": -25.0, "embedding_diversity": 0.4})
    b = str(tmp_path / "baselines")
    _write(b, "baselines.json", {"beam_n": {"logp_mean": -9.5, "embedding_diversity": 0.05},
                                 "sample": {"logp_mean": -40.0, "embedding_diversity": 0.6}})
    _write(b, "run.json", {"command": "python -m gfn_jax.baselines --config c.py --out b",
                           "hardware": "2-core CPU", "wall_time_s": 55.0, "task": "continuation"})
    rng = train_run(tmp_path, "rng", "rng", 1.0, {"valid_fraction": 0.9997, "tv": 0.033})
    out = str(tmp_path / "docs" / "results.md")
    assert report.main([g1, g2, b, rng, "--out", out, "--title", "T"]) == 0
    text = open(out).read()
    lines = text.splitlines()

    def row(method):
        return next(x for x in lines if x.startswith(f"| {method} |"))

    # each number sits in a row that names its run directory and evaluation
    r = row("GFlowNet (subtb, T_end=0.8)")
    assert "-21.5" in r and "-12.25" in r and "0.31" in r and f"`{g1}` (after)" in r
    assert f"`{g1}` (before)" in row("base model (sampling)")
    assert "-9.5" in row("beam_n")
    assert row("beam_n").endswith(f"`{b}` |")  # the tag is the method: not repeated
    # continuation columns in the headline order; rng shows all its metrics
    head = next(x for x in lines if x.startswith("| method | logp_mean"))
    assert head.split(" | ")[1:4] == ["logp_mean", "logp_max", "embedding_diversity"]
    assert "| method | valid_fraction | tv |" in text and "0.9997" in text
    # the Runs table: command, hardware, wall time, or "not recorded"
    runs = text[text.index("## Runs"):]
    assert ("| `%s` | continuation | `gfn-jax train --config configs/continuation.py "
            "--workdir gfn_t08` | 1 x H200 | 123.4 |" % g1) in runs
    assert f"| `{g2}` | continuation | `not recorded` | not recorded | 123.4 |" in runs
    assert "2-core CPU | 55 |" in runs
    png = tmp_path / "docs" / "results_plots" / "continuation_likelihood_diversity.png"
    assert png.is_file() and png.stat().st_size > 1000
    assert "](results_plots/continuation_likelihood_diversity.png)" in text
    assert not (tmp_path / "docs" / "results_plots" / "rng_likelihood_diversity.png").exists()


def test_report_points_and_errors(tmp_path):
    g = train_run(tmp_path, "g", "continuation", 0.9, {"logp_mean": -20.0,
                                                        "word_distinct_2": 0.7})
    rows = report.collect_rows([report.read_run(g)])["continuation"]
    x_key, y_key, pts = report._xy(rows, "continuation")
    assert (x_key, y_key) == ("word_distinct_2", "logp_mean")  # fallback diversity metric
    assert [(p[1], p[2]) for p in pts] == [(0.7, -20.0)] and pts[0][0]["temp_end"] == 0.9
    run = report.read_run(g)
    assert run["last_metrics"]["loss"] == 1.5 and run["command"] == "not recorded"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="is not a run directory"):
        report.read_run(str(empty))
    assert report.main([str(empty), "--out", str(tmp_path / "r.md")]) == 2


def _dump(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return str(path)


def test_experiment_outputs_and_sections(tmp_path):
    """Experiment-script outputs become tables (SUBJ's per-k files merge into one row per
    method); a sections file lays out notes and tables; a missing run is a clear error."""
    arith = tmp_path / "arith"
    _dump(arith / "eval_sft.json", {"id_accuracy": 0.65, "ood_accuracy": 0.2,
                                    "id_parsed_fraction": 1.0, "ood_parsed_fraction": 0.5})
    _dump(arith / "eval_gfn.json", {"id_accuracy": 0.0, "ood_accuracy": 0.0, "info": "text"})
    _dump(arith / "wall_times.json", {"train_sft": 100.0, "eval_sft": 20.0, "train_gfn": 30.0})
    _dump(arith / "experiment.json", {"command": "python scripts/arithmetic_experiment.py",
                                      "hardware": "2 cores"})
    subj = []
    for k, acc in ((10, 0.61), (20, 0.67)):
        subj.append(_dump(tmp_path / f"subj_k{k}" / "results.json", {
            "k": k, "rounds": [{"round": 0, "em": {"vote_accuracy": acc}}],
            "baselines": {"zero_shot": 0.62}, "times_s": {"e0": 5.0, "m0": 6.0}}))
    toy = _dump(tmp_path / "toy.json", {"meta": {"command": "python scripts/toy_objectives.py",
                                                 "cpus": 2},
                                        "results": [{"setting": "tb", "tv": 0.03}]})
    (tmp_path / "intro.md").write_text("Intro words.")
    (tmp_path / "arith.md").write_text("Arithmetic findings.\n<!-- tables -->\nAfter the table.")
    spec = _dump(tmp_path / "sections.json", {
        "title": "All results", "intro": str(tmp_path / "intro.md"),
        "sections": [
            {"title": "Arithmetic", "notes": str(tmp_path / "arith.md"), "runs": [str(arith)]},
            {"title": "SUBJ", "runs": [str(tmp_path / "subj_k*")]},
            {"title": "Toy", "runs": [toy]}]})
    out = str(tmp_path / "docs" / "results.md")
    assert report.main(["--sections", spec, "--out", out]) == 0
    text = open(out).read()
    assert text.startswith("# All results") and "Intro words." in text
    assert (text.index("## Arithmetic") < text.index("Arithmetic findings.") < text.index("| SFT |")
            < text.index("After the table.") < text.index("## SUBJ"))
    assert "<!-- tables -->" not in text
    sft = next(x for x in text.splitlines() if x.startswith("| SFT |"))
    assert "0.65" in sft and "0.75" in sft and "100" in sft  # parsed = mean of 1.0 and 0.5
    head = next(x for x in text.splitlines() if x.startswith("| method | accuracy_k10"))
    assert head.startswith("| method | accuracy_k10 | accuracy_k20 |")
    vote = next(x for x in text.splitlines() if "majority vote" in x)
    assert "0.61" in vote and "0.67" in vote and "subj_k10" in vote and "subj_k20" in vote
    assert "python scripts/arithmetic_experiment.py" in text and "| 150.0 |" in text
    assert "python scripts/toy_objectives.py" in text and "| 0.03 |" in text

    spec2 = _dump(tmp_path / "bad.json", {"sections": [{"title": "Gone",
                                                        "runs": [str(tmp_path / "nope")]}]})
    assert report.main(["--sections", spec2, "--out", out]) == 2
    with pytest.raises(ValueError, match="Gone.*nope"):
        report.write_sectioned_report(spec2, out)
    with pytest.raises(ValueError, match="not a results file"):
        report.read_run(_dump(tmp_path / "other.json", {"x": 1}))


def test_one_base_row_and_twin_labels_named(tmp_path):
    """The base model evaluated before each of several runs appears once; two runs with the
    same label (same objective and T_end, e.g. two learning rates) are told apart."""
    a = train_run(tmp_path, "lr3e-4", "continuation", 0.8, {"logp_mean": -8.0},
                  before={"logp_mean": -63.5})
    b = train_run(tmp_path, "lr1e-4", "continuation", 0.8, {"logp_mean": -40.0},
                  before={"logp_mean": -63.5})
    rows = report.collect_rows([report.read_run(a), report.read_run(b)])["continuation"]
    methods = sorted(r["method"] for r in rows)
    assert methods == ["GFlowNet (subtb, T_end=0.8) [lr1e-4]",
                       "GFlowNet (subtb, T_end=0.8) [lr3e-4]", "base model (sampling)"]
    c = train_run(tmp_path / "other_sweep", "lr3e-4", "continuation", 0.8, {"logp_mean": -9.0})
    rows = report.collect_rows([report.read_run(x) for x in (a, b, c)])["continuation"]
    assert sorted(r["method"] for r in rows)[:3] == [
        "GFlowNet (subtb, T_end=0.8) [lr1e-4]", "GFlowNet (subtb, T_end=0.8) [other_sweep/lr3e-4]",
        f"GFlowNet (subtb, T_end=0.8) [{tmp_path.name}/lr3e-4]"]
