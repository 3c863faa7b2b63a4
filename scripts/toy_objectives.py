"""Every objective on the exactly solvable toy task, each against its own exact target.

    python scripts/toy_objectives.py --out docs/figures [--runs runs/toy_objectives]

For each setting it runs ``gfn-jax train`` (configs/toy_exact.py, the config's own settings
plus the overrides below), draws 10,000 samples with ``gfn-jax sample``, and measures the total
variation to the distribution that objective should reach:

* subtb / tb / db: q ∝ R;
* sft on 10,000 draws from a known distribution (∝ 1/R): that distribution;
* reinforce / ppo with KL coefficient β to the initial policy p_ref: q* ∝ p_ref · R^(1/β)
  (p_ref enumerated exactly); with a small β also the mass on the highest-reward outcome.

Writes ``toy_objectives.json`` (every number), ``toy_objectives.md`` (the table) and
``toy_distributions.png`` (target ∝ R, GFlowNet, PPO with a small β, SFT on draws from the
target, over the 39 outcomes) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

RL = {"explore.p_on_policy": 1.0, "explore.p_tempered": 0.0}
PPO = {"objective.ppo_epochs": 4, "objective.ppo_minibatches": 2, "train.steps": 150}
SETTINGS = [
    ("subtb", {"objective.name": "subtb"}, "reward"),
    ("tb", {"objective.name": "tb"}, "reward"),
    ("db", {"objective.name": "db"}, "reward"),
    ("sft (data ∝ 1/R)", {"objective.name": "sft", "task.targets_num": 10000,
                          "task.targets_dist": "inverse", "train.steps": 800}, "inverse"),
    ("sft (data ∝ R)", {"objective.name": "sft", "task.targets_num": 10000,
                        "task.targets_dist": "reward", "train.steps": 800}, "reward"),
    ("reinforce β=1", {"objective.name": "reinforce", "objective.kl_coef": 1.0, **RL}, "kl1"),
    ("ppo β=1", {"objective.name": "ppo", "objective.kl_coef": 1.0, **RL, **PPO}, "kl1"),
    ("reinforce β=0.02", {"objective.name": "reinforce", "objective.kl_coef": 0.02, **RL},
     "mode"),
    ("ppo β=0.02", {"objective.name": "ppo", "objective.kl_coef": 0.02, **RL, **PPO}, "mode"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "figures"))
    ap.add_argument("--runs", default=os.path.join(ROOT, "runs", "toy_objectives"))
    ap.add_argument("--only", default="", help="comma-separated setting names")
    args = ap.parse_args()

    from test_baselines import initial_policy_distribution, kl_regularised_optimum

    from gfn_jax import cli
    from gfn_jax.tasks.toy import (toy_data_distribution, toy_log_reward_text, toy_outcomes,
                                   toy_target, total_variation)

    outs = toy_outcomes()
    targets = {"reward": toy_target(), "inverse": toy_data_distribution("inverse"),
               "kl1": kl_regularised_optimum(initial_policy_distribution(), 1.0)}
    mode = max(outs, key=toy_log_reward_text)
    os.makedirs(args.out, exist_ok=True)
    results, dists = [], {}
    only = set(filter(None, args.only.split(",")))
    for name, over, target in SETTINGS:
        if only and name not in only:
            continue
        wd = os.path.join(args.runs, name.replace(" ", "_").replace("∝", "p").replace("/", ""))
        flags = [f"--config.{k}={v}" for k, v in over.items()]
        t0 = time.time()
        rc = cli.main(["gfn-jax", "train", "--config", os.path.join(ROOT, "configs/toy_exact.py"),
                       "--workdir", wd, "--noprogress", "--noresume", "--move_aside",
                       "--config.eval.num_samples=0"] + flags)
        wall = time.time() - t0
        assert rc == 0, name
        out = os.path.join(wd, "samples.jsonl")
        assert cli.main(["gfn-jax", "sample", "--workdir", wd, "--num", "10000", "--output", out,
                         "--seed", "11"]) == 0
        counts = {}
        for line in open(out):
            t = json.loads(line)["text"]
            counts[t] = counts.get(t, 0) + 1
        emp = {k: v / 10000 for k, v in counts.items()}
        dists[name] = emp
        steps = json.load(open(os.path.join(wd, "summary.json")))["steps"]
        row = {"setting": name, "steps": steps, "train_wall_s": round(wall, 1),
               "target": target, "mass_on_mode": emp.get(mode, 0.0)}
        if target in targets:
            row["tv"] = total_variation(emp, targets[target])
        row["tv_to_reward_target"] = total_variation(emp, targets["reward"])
        results.append(row)
        print(json.dumps(row, ensure_ascii=False), flush=True)
    meta = {"command": "python scripts/toy_objectives.py", "machine": platform.machine(),
            "processor": platform.processor() or "unknown", "cpus": os.cpu_count(),
            "python": platform.python_version()}
    with open(os.path.join(args.out, "toy_objectives.json"), "w") as f:
        json.dump({"meta": meta, "results": results, "distributions": dists}, f, indent=1,
                  ensure_ascii=False)
    what = {"reward": "q ∝ R", "inverse": "data ∝ 1/R", "kl1": "q* ∝ p_ref·R",
            "mode": f"mass on the mode {mode!r}"}
    lines = ["| objective | rollouts | train wall time (s) | its exact target | TV to it | "
             "mass on 'aaa' |", "|---|---|---|---|---|---|"]
    for r in results:
        tv = f"{r['tv']:.3f}" if "tv" in r else "–"
        lines.append(f"| {r['setting']} | {r['steps']} | {r['train_wall_s']} | "
                     f"{what[r['target']]} | {tv} | {r['mass_on_mode']:.3f} |")
    with open(os.path.join(args.out, "toy_objectives.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(outs, targets["reward"], dists, os.path.join(args.out, "toy_distributions.png"))


def _plot(outs, target, dists, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(outs, key=lambda z: -target[z])
    series = [("target ∝ R", target)]
    for name, label in (("subtb", "GFlowNet (SubTB)"), ("ppo β=0.02", "PPO (β = 0.02)"),
                        ("sft (data ∝ R)", "SFT on 10,000 draws of the target")):
        if name in dists:
            series.append((label, dists[name]))
    fig, ax = plt.subplots(figsize=(12, 4.2))
    w = 0.8 / len(series)
    x = np.arange(len(order))
    for k, (label, d) in enumerate(series):
        ax.bar(x + (k - (len(series) - 1) / 2) * w, [d.get(z, 0.0) for z in order], w,
               label=label)
    ax.set_xticks(x)
    ax.set_xticklabels(order, rotation=90, fontsize=8)
    ax.set_xlabel("outcome Z (sorted by R)")
    ax.set_ylabel("probability")
    ax.set_yscale("log")
    ax.set_ylim(1e-4, 1.0)
    ax.set_title("Toy task (39 outcomes): GFlowNet samples ∝ R; PPO collapses onto the mode")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print("wrote", path)


if __name__ == "__main__":
    main()
