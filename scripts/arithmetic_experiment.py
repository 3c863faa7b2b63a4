"""Arithmetic with a calculator: the GFlowNet and its baselines on the same queries.

Trains, in OUT/ (each phase skipped when its output exists, so a re-run resumes)::

    OUT/gfn/   modified SubTB (configs/arithmetic.py)
    OUT/sft/   SFT on the 10 labelled rationales
    OUT/ppo/   PPO on the same reward (KL-shaped to the base model, on-policy only)

then evaluates each, and the few-shot prompted base model, by the same function
(``python -m gfn_jax.tasks.arithmetic``: majority vote over ``--vote_k`` rationales at the
config's T = 0.1, in distribution on fresh 3/4-operand queries disjoint from every training
file, out of distribution on 5-operand queries) into OUT/eval_<method>.json, and writes
OUT/results.md (table, commands, wall times).

Example (the figures in docs/results.md)::

    python scripts/arithmetic_experiment.py --out runs/arith --steps 80 --ppo_steps 41 \
        --eval_num 20
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "arithmetic.py")
METHODS = ("few_shot", "sft", "ppo", "gfn")
LABELS = {"few_shot": "few-shot prompting (3 rationales in the prompt)",
          "sft": "SFT on the 10 labelled rationales",
          "ppo": "PPO on the same reward (beta = 0.05, 2 epochs per rollout)",
          "gfn": "GFlowNet (modified SubTB)"}


def train_flags(method: str, steps: int, ppo_steps: int = 0) -> List[str]:
    """Config overrides of each trained method (all share the model, LoRA, data and lr; the
    schedules follow ``steps``; PPO stops after ``ppo_steps`` rollouts when given)."""
    n = ppo_steps if method == "ppo" and ppo_steps else steps
    base = [f"--config.train.steps={n}", f"--config.train.ckpt_every={max(steps // 4, 1)}",
            f"--config.optim.warmup_steps={max(steps // 8, 1)}",
            "--config.eval.num_samples=0"]  # evaluated below by the T = 0.1 vote instead
    if method == "gfn":
        return base + [f"--config.reward.temp_horizon={max(steps // 2, 1)}"]
    off_policy_off = ["--config.explore.p_on_policy=1.0", "--config.explore.p_tempered=0.0",
                      "--config.explore.p_replay=0.0", "--config.replay.seed_from_data=False"]
    if method == "sft":
        return base + ["--config.objective.name=sft"] + off_policy_off
    if method == "ppo":
        return base + ["--config.objective.name=ppo", "--config.objective.ppo_epochs=2",
                       "--config.objective.ppo_minibatches=1", "--config.reward.temp_start=1.0",
                       "--config.reward.temp_end=1.0"] + off_policy_off
    raise ValueError(method)


def run(cmd: List[str], log: str) -> float:
    """Run ``cmd`` with its output appended to ``log``; returns the wall seconds."""
    print("+", shlex.join(cmd), flush=True)
    t0 = time.time()
    with open(log, "a") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        raise SystemExit(f"error: command failed (exit {rc}), see {log}: {shlex.join(cmd)}")
    return time.time() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=80, help="training steps of each method")
    ap.add_argument("--ppo_steps", type=int, default=0,
                    help="PPO rollouts (0: --steps; each rollout is 2 epochs = 2 updates)")
    ap.add_argument("--eval_num", type=int, default=20,
                    help="queries in distribution and out of distribution each")
    ap.add_argument("--vote_k", type=int, default=10)
    ap.add_argument("--methods", default=",".join(METHODS))
    a = ap.parse_args()
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    times_path = os.path.join(out, "wall_times.json")
    from gfn_jax.report import write_experiment_meta

    write_experiment_meta(out)  # the command and hardware, for `gfn-jax report`
    times: Dict[str, float] = json.load(open(times_path)) if os.path.exists(times_path) else {}
    cmds: Dict[str, List[str]] = {}
    ev_set = ["--set", f"eval_id_num={a.eval_num}", "--set", f"eval_ood_num={a.eval_num}",
              "--k", str(a.vote_k)]
    methods = [m for m in a.methods.split(",") if m]
    for m in methods:
        wd = os.path.join(out, m)
        if m != "few_shot":
            cmd = ["gfn-jax", "train", "--config", CONFIG, "--workdir", wd, "--noprogress"]
            cmd += train_flags(m, a.steps, a.ppo_steps)
            cmds[f"train_{m}"] = cmd
            if not os.path.exists(os.path.join(wd, "DONE")):
                times[f"train_{m}"] = run(cmd, os.path.join(out, f"train_{m}.log"))
                json.dump(times, open(times_path, "w"), indent=1)
        res = os.path.join(out, f"eval_{m}.json")
        cmd = [sys.executable, "-m", "gfn_jax.tasks.arithmetic"]
        cmd += (["--few_shot", "--config", CONFIG] if m == "few_shot" else ["--workdir", wd])
        cmd += ev_set + ["--out", res] + (["--no_diagnostics"] if m == "few_shot" else [])
        cmds[f"eval_{m}"] = cmd
        if not os.path.exists(res):
            times[f"eval_{m}"] = run(cmd, os.path.join(out, f"eval_{m}.log"))
            json.dump(times, open(times_path, "w"), indent=1)
    write_report(out, methods, cmds, times, a)
    return 0


def write_report(out: str, methods: List[str], cmds: Dict[str, List[str]],
                 times: Dict[str, float], a: argparse.Namespace) -> None:
    """OUT/results.md: one row per method, the commands and wall times."""
    from gfn_jax.baselines import hardware

    rows = ["| method | in-distribution (3-4 operands): vote / one sample | "
            "OOD (5 operands): vote / one sample | parsed answers | log Z (IW) | ESS fraction "
            "| train wall | eval wall |", "|---|---|---|---|---|---|---|---|"]
    for m in methods:
        p = os.path.join(out, f"eval_{m}.json")
        if not os.path.exists(p):
            continue
        r = json.load(open(p))
        nan = float("nan")
        acc = {s: f"{r.get(f'{s}_accuracy', nan):.2f} / {r.get(f'{s}_sample_accuracy', nan):.2f}"
               for s in ("id", "ood")}
        parsed = (r.get("id_parsed_fraction", nan) + r.get("ood_parsed_fraction", nan)) / 2
        lz = r.get("log_z_iw", nan)
        ess = r.get("ess_fraction", nan)
        tt = times.get(f"train_{m}")
        rows.append(f"| {LABELS[m]} | {acc['id']} | {acc['ood']} | {parsed:.2f} | {lz:.2f} | "
                    f"{ess:.3f} | "
                    f"{'-' if tt is None else f'{tt / 60:.1f} min'} | "
                    f"{times.get(f'eval_{m}', 0) / 60:.1f} min |")
    text = ["# Arithmetic with a calculator: results", "",
            f"Hardware: {hardware()}; {a.eval_num} + {a.eval_num} queries, "
            f"majority vote over {a.vote_k} rationales.", ""] + rows + ["", "Commands:", ""]
    text += [f"    {shlex.join(c)}" for c in cmds.values()]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    sys.exit(main())
