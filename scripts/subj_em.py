"""SUBJ with a latent rationale: alternating E and M steps, prediction and baselines.

One run directory per number of labelled examples k (10, 20, 50)::

    OUT/e0/           E-step run (configs/subj_cot.py): GFlowNet policy q(Z | X)
    OUT/rationales_r0.jsonl   Z sampled from e0: train rows x --train_rationales, test rows
                      x (1 greedy + --vote_k sampled)
    OUT/m0/           M-step run (configs/subj_mstep.py): LoRA classifier p(Y | X Z)
    OUT/export/m0/    M-step model exported (`gfn-jax convert`): the reward model of the E-step
                      of the next round with --m_reward (round r >= 1 trains OUT/e<r> afresh)
    OUT/export/e0/    the E-step policy exported too (OUT/export/cls: the LoRA baseline)
    OUT/baselines/    zero-shot, few-shot (base model prompted), supervised LoRA (OUT/cls)
    OUT/results.json  every accuracy on the same test rows, by the same scorer

Each phase writes a DONE marker in its directory; re-running the same command skips finished
phases. ``--summarize DIR...`` gathers results.json files into an accuracy-vs-k table and
``--plot`` draws it.

Examples (from the repository root)::

    python scripts/subj_em.py --k 10 --out runs/subj_k10 --rounds 1 --baselines
    python scripts/subj_em.py --summarize runs/subj_k10 runs/subj_k20 runs/subj_k50 \\
        --plot runs/subj_accuracy.png
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METHODS = ("zero_shot", "few_shot", "supervised_lora", "e_only_vote", "em_greedy", "em_vote",
           "em_mean_prob")
LABELS = {"zero_shot": "zero-shot prompting", "few_shot": "few-shot prompting (k in prompt)",
          "supervised_lora": "supervised LoRA (no Z)",
          "e_only_vote": "E-step Z + base model, vote",
          "em_greedy": "E/M: greedy Z", "em_vote": "E/M: majority vote over Z",
          "em_mean_prob": "E/M: mean p(Y|XZ) over Z"}


# ---------------------------------------------------------------------------- configs
def parse_overrides(items: Sequence[str]) -> Dict[str, Any]:
    """``["a.b=1", "c=text"]`` -> ``{"a.b": 1, "c": "text"}`` (values parsed as JSON when
    they are JSON, else kept as strings)."""
    out: Dict[str, Any] = {}
    for kv in items:
        key, sep, val = kv.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: override {kv!r} is not KEY=VALUE")
        try:
            out[key] = json.loads(val)
        except ValueError:
            out[key] = val
    return out


def load_config(name: str, k: int, data_dir: str, overrides: Dict[str, Any]) -> Any:
    """configs/<name>.py with the k-example training file, absolute data paths, overrides."""
    c = runpy.run_path(os.path.join(ROOT, "configs", f"{name}.py"))["get_config"]()
    c.task.data_path = os.path.join(data_dir, f"train.{k}.jsonl")
    c.task.eval_path = os.path.join(data_dir, "test.jsonl")
    for key, v in overrides.items():
        node = c
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[p]
        if parts[-1] not in node:
            raise SystemExit(f"error: unknown config key {key!r} for configs/{name}.py")
        with node.ignore_type():
            node[parts[-1]] = tuple(v) if isinstance(v, list) else v
    return c


def done(d: str) -> bool:
    return os.path.exists(os.path.join(d, "DONE"))


def train(config: Any, workdir: str, progress: bool) -> float:
    """Train (or finish) a run in ``workdir``; returns wall seconds (0 if it was done)."""
    if done(workdir):
        return 0.0
    from gfn_jax.train import Trainer

    t0 = time.time()
    Trainer(config, workdir, restore=True).run(progress=progress)
    open(os.path.join(workdir, "DONE"), "w").close()
    return time.time() - t0


def export(workdir: str) -> str:
    """``gfn-jax convert --workdir OUT/W --out OUT/export/W`` (LoRA merged into a Hugging Face
    directory; convert refuses a directory inside the run)."""
    out = os.path.join(os.path.dirname(workdir), "export", os.path.basename(workdir))
    if not os.path.isfile(os.path.join(out, "config.json")):
        from gfn_jax import cli

        rc = cli.main(["gfn-jax", "convert", "--workdir", workdir, "--out", out, "--overwrite"])
        if rc != 0:
            raise SystemExit(f"error: gfn-jax convert of {workdir} failed (exit {rc})")
    return out


# ---------------------------------------------------------------------------- rationales
def write_rationales(e_dir: str, path: str, train_n: int, vote_k: int, eval_num: int,
                     temperature: float, seed: int, progress: bool) -> None:
    """Sample rationales from the E-step policy of ``e_dir`` into ``path`` (JSON lines)."""
    if os.path.exists(path):
        return
    from gfn_jax.policy import load_run

    _, task, policy, _ = load_run(e_dir)
    test = task.test_rows()[:eval_num] if eval_num else task.test_rows()
    recs: List[Dict[str, Any]] = []

    def add(split: str, rows: Sequence[Any], samples: List[Dict[str, Any]], n: int,
            greedy: bool) -> None:
        for j, s in enumerate(samples):
            i = j // n
            recs.append({"split": split, "index": i, "text": rows[i].text,
                         "z_tokens": list(s["tokens"]), "z_text": s["text"], "greedy": greedy,
                         "log_q": s["log_q"]})

    tr = task.train_rows
    add("train", tr, policy.sample([task.t.x_text(r) for r in tr], n=train_n,
                                   temperature=temperature, seed=seed, progress=progress,
                                   desc="train rationales"), train_n, False)
    xs = [task.t.x_text(r) for r in test]
    add("test", test, policy.sample(xs, n=1, top_k=1, seed=seed + 1, progress=progress,
                                    desc="greedy test rationales"), 1, True)
    add("test", test, policy.sample(xs, n=vote_k, temperature=temperature, seed=seed + 2,
                                    progress=progress, desc="sampled test rationales"),
        vote_k, False)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- evaluation
def evaluate_run(workdir: str, out_path: Optional[str] = None) -> Dict[str, float]:
    """SubjLabelTask.evaluate_policy of a trained classifier run."""
    from gfn_jax.policy import load_run

    _, task, policy, _ = load_run(workdir)
    return task.evaluate_policy(policy, out_path)


def evaluate_base_with(config: Any, rationales: Optional[str], out_path: Optional[str] = None
                       ) -> Dict[str, float]:
    """The base model (adapters off) as the classifier, given rationales (or none)."""
    from gfn_jax.policy import Policy, load_base_model
    from gfn_jax.tasks import make_task

    cfg = config.task.to_dict()
    cfg["rationales_path"] = rationales or ""
    task = make_task(cfg, config.data.root)
    mcfg, params, tok = load_base_model(config, task)
    task.setup(mcfg, tok)
    pol = Policy(model_config=mcfg, params=params, adapters=None, spec=task.policy_spec(),
                 tokenizer=tok)
    return task.evaluate_policy(pol, out_path)


def prompting_baselines(config: Any, few_shot_max: int = 0) -> Dict[str, float]:
    """Zero-shot and few-shot (the labelled examples, at most ``few_shot_max`` if > 0, in the
    prompt) accuracy of the base model on the task's test rows."""
    import numpy as np

    from gfn_jax.policy import load_base_model
    from gfn_jax.tasks import make_task
    from gfn_jax.tasks.subj import candidate_log_probs, predict_rows, prompting_prompts

    task = make_task(config.task, config.data.root)
    mcfg, params, tok = load_base_model(config, task)
    task.setup(mcfg, tok)
    gold = np.array([r.label for r in task.test])
    cands = [task.t.label_continuation(c) for c in range(len(task.t.labels))]
    shots = task.train_rows[:few_shot_max] if few_shot_max else task.train_rows
    out: Dict[str, float] = {"few_shot_examples": float(len(shots))}
    for name, sh in (("zero_shot", ()), ("few_shot", shots)):
        ids = prompting_prompts(task.t, task.test, sh)
        s = candidate_log_probs(mcfg, params, ids, cands, batch_size=task.eval_batch_size,
                                pad_id=int(tok.pad_id or 0))
        pred = predict_rows(s, [[i] for i in range(len(ids))])["single"]
        out[name] = float(np.mean(pred == gold))
    return out


# ---------------------------------------------------------------------------- the loop
def run(a: argparse.Namespace) -> Dict[str, Any]:
    over = parse_overrides(a.set)
    data_dir = os.path.abspath(a.data_dir)
    os.makedirs(a.out, exist_ok=True)
    res_path = os.path.join(a.out, "results.json")
    res: Dict[str, Any] = json.load(open(res_path)) if os.path.exists(res_path) else {}
    res.update({"k": a.k, "rounds": res.get("rounds", []), "eval_num": a.eval_num,
                "vote_k": a.vote_k, "train_rationales": a.train_rationales})
    times = res.setdefault("times_s", {})
    from gfn_jax.report import write_experiment_meta

    write_experiment_meta(a.out)  # the command and hardware, for `gfn-jax report`

    def save() -> None:
        with open(res_path + ".tmp", "w") as f:
            json.dump(res, f, indent=2)
        os.replace(res_path + ".tmp", res_path)

    def cfg(name: str, extra: Dict[str, Any]) -> Any:
        c = load_config(name, a.k, data_dir, {**over, **parse_overrides(extra)})
        c.task.eval_num = a.eval_num
        return c

    reward_model = ""
    for r in range(a.rounds):
        e_dir, m_dir = os.path.join(a.out, f"e{r}"), os.path.join(a.out, f"m{r}")
        ec = cfg("subj_cot", a.set_e)
        if a.e_steps:
            ec.train.steps = a.e_steps
        ec.eval.num_samples = 0
        if reward_model:
            ec.reward.model = reward_model
        t = train(ec, e_dir, a.progress)
        times[f"e{r}"] = times.get(f"e{r}", 0.0) + t
        if a.export:
            export(e_dir)
        rat = os.path.join(a.out, f"rationales_r{r}.jsonl")
        t0 = time.time()
        write_rationales(e_dir, rat, a.train_rationales, a.vote_k, a.eval_num, a.temperature,
                         a.seed + r, a.progress)
        times[f"rationales_r{r}"] = times.get(f"rationales_r{r}", 0.0) + time.time() - t0
        mc = cfg("subj_mstep", a.set_m)
        mc.task.rationales_path = os.path.abspath(rat)
        if a.m_steps:
            mc.train.steps = a.m_steps
        times[f"m{r}"] = times.get(f"m{r}", 0.0) + train(mc, m_dir, a.progress)
        rec = next((x for x in res["rounds"] if x["round"] == r), None)
        if rec is None or "em" not in rec:
            t0 = time.time()
            rec = {"round": r, "reward_model": reward_model or "base",
                   "em": evaluate_run(m_dir, os.path.join(m_dir, "test_predictions.jsonl"))}
            if r == 0 and a.e_only:
                rec["e_only"] = evaluate_base_with(mc, rat)
            times[f"eval_r{r}"] = time.time() - t0
            res["rounds"] = [x for x in res["rounds"] if x["round"] != r] + [rec]
            save()
        print(f"round {r}: {json.dumps(rec)}")
        if a.m_reward and r + 1 < a.rounds:
            reward_model = export(m_dir)
    if a.baselines:
        b = res.setdefault("baselines", {})
        if "zero_shot" not in b:
            t0 = time.time()
            b.update(prompting_baselines(cfg("subj_classify", a.set_c), a.few_shot_max))
            times["prompting"] = time.time() - t0
            save()
        cls_dir = os.path.join(a.out, "cls")
        cc = cfg("subj_classify", a.set_c)
        if a.cls_steps:
            cc.train.steps = a.cls_steps
        times["cls"] = times.get("cls", 0.0) + train(cc, cls_dir, a.progress)
        if "supervised_lora" not in b:
            b["supervised_lora"] = evaluate_run(cls_dir)["accuracy"]
        if a.export:
            export(cls_dir)
    save()
    return res


# ---------------------------------------------------------------------------- summary
def method_accuracies(res: Dict[str, Any]) -> Dict[str, float]:
    """{method: test accuracy} of one results.json (the last E/M round)."""
    out: Dict[str, float] = {}
    b = res.get("baselines", {})
    for m in ("zero_shot", "few_shot", "supervised_lora"):
        if m in b:
            out[m] = float(b[m])
    rounds = sorted(res.get("rounds", []), key=lambda x: x["round"])
    if rounds:
        em = rounds[-1]["em"]
        for m, key in (("em_greedy", "greedy_accuracy"), ("em_vote", "vote_accuracy"),
                       ("em_mean_prob", "mean_prob_accuracy")):
            if key in em:
                out[m] = float(em[key])
        e0 = rounds[0].get("e_only")
        if e0 and "vote_accuracy" in e0:
            out["e_only_vote"] = float(e0["vote_accuracy"])
    return out


def accuracy_table(results: Sequence[Dict[str, Any]]) -> Dict[str, Dict[int, float]]:
    """{method: {k: accuracy}} over several results.json dicts (one per k)."""
    table: Dict[str, Dict[int, float]] = {}
    for res in results:
        for m, v in method_accuracies(res).items():
            table.setdefault(m, {})[int(res["k"])] = v
    return table


def plot_accuracy(table: Dict[str, Dict[int, float]], path: str, title: str = "") -> None:
    """Test accuracy against the number of labelled examples, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ks = sorted({k for v in table.values() for k in v})
    for m in [m for m in METHODS if m in table] + [m for m in table if m not in METHODS]:
        xs = sorted(table[m])
        ax.plot(xs, [table[m][k] for k in xs], marker="o", label=LABELS.get(m, m))
    ax.axhline(0.5, color="grey", lw=0.8, ls=":", label="chance")
    ax.set_xscale("log")
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("labelled training examples k")
    ax.set_ylabel("test accuracy")
    ax.set_title(title or "SUBJ test accuracy vs number of labels")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(dirs: Sequence[str], plot: Optional[str]) -> Dict[str, Dict[int, float]]:
    results = []
    for d in dirs:
        p = os.path.join(d, "results.json")
        if not os.path.exists(p):
            raise SystemExit(f"error: {p} not found (run the driver for that k first)")
        results.append(json.load(open(p)))
    table = accuracy_table(results)
    ks = sorted({k for v in table.values() for k in v})
    print("| method | " + " | ".join(f"k={k}" for k in ks) + " |")
    print("| --- |" + " --- |" * len(ks))
    for m, v in table.items():
        print(f"| {LABELS.get(m, m)} | " + " | ".join(
            f"{v[k]:.3f}" if k in v else "-" for k in ks) + " |")
    if plot:
        plot_accuracy(table, plot)
        print(f"wrote {plot}")
    return table


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=10, help="labelled examples: train.<k>.jsonl")
    ap.add_argument("--out", help="output directory of this k")
    ap.add_argument("--data_dir", default=os.path.join(ROOT, "..", "shared", "data", "subj"))
    ap.add_argument("--rounds", type=int, default=1, help="E/M rounds")
    ap.add_argument("--m_reward", action="store_true",
                    help="rounds >= 1: the previous M-step model (exported) is the reward model")
    ap.add_argument("--e_steps", type=int, default=0, help="E-step steps (0: the config's)")
    ap.add_argument("--m_steps", type=int, default=0, help="M-step steps (0: the config's)")
    ap.add_argument("--cls_steps", type=int, default=0, help="LoRA baseline steps")
    ap.add_argument("--train_rationales", type=int, default=8,
                    help="rationales sampled per training example for the M-step")
    ap.add_argument("--vote_k", type=int, default=8, help="sampled rationales per test row")
    ap.add_argument("--eval_num", type=int, default=200, help="first N test rows (0: 2,000)")
    ap.add_argument("--temperature", type=float, default=1.0, help="rationale sampling")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baselines", action="store_true",
                    help="zero-shot, few-shot and supervised LoRA on the same test rows")
    ap.add_argument("--few_shot_max", type=int, default=0,
                    help="at most this many examples in the few-shot prompt (0: all k)")
    ap.add_argument("--no_e_only", dest="e_only", action="store_false",
                    help="skip the base-model-with-E-rationales evaluation")
    ap.add_argument("--no_export", dest="export", action="store_false",
                    help="do not export the E-step and baseline runs")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every run, e.g. model.spec=random")
    ap.add_argument("--set_e", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--set_m", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--set_c", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--noprogress", dest="progress", action="store_false")
    ap.add_argument("--summarize", nargs="+", metavar="DIR",
                    help="print the accuracy table of these output directories")
    ap.add_argument("--plot", help="with --summarize: write the accuracy-vs-k plot here")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    if a.summarize:
        summarize(a.summarize, a.plot)
        return 0
    if not a.out:
        raise SystemExit("error: --out is required (or --summarize)")
    run(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
