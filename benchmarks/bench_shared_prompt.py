#!/usr/bin/env python
"""Shared-prompt scoring vs row-by-row scoring, side by side in one process.

The train step scores K samples of one prompt. Row by row (``group_size=1``, the path with
``model.share_prompt=False``) every row recomputes the prompt X; shared (``group_size=K``)
X runs once and the K continuations attend to its keys/values. This script times, on random
weights of a given architecture, float32:

* ``step``: ``value_and_grad`` of the SubTB loss w.r.t. the LoRA adapters, with the policy
  forward/backward over ``[X | Z]`` (:func:`~gfn_jax.scoring.score_policy`), the reward of
  every prefix on the base weights (:func:`~gfn_jax.scoring.score_reward_prefixes`) and,
  with ``--suffix-len > 0``, the packed suffix scorer
  (:func:`~gfn_jax.scoring.score_suffix_prefixes`) whose log p(Y | X z_<i) joins log R;
* ``policy``: the policy forward/backward alone; ``reward``: the reward forward(s) alone.

The two paths alternate (old, new, new, old, ...) so that load from other processes on a
shared machine hits both alike; the printed ratio is the median of the per-round ratios.
A float32 check prints the largest difference of the loss, log-probs and gradients.

Settings of issue #10: ``--setting A`` (16 samples of one prompt, |X| = 59, |Z| = 20,
suffix |Y| = 10, LoRA r = 64 on q, k, v, o) and ``--setting B`` (|X| = 30, no Y)::

    python benchmarks/bench_shared_prompt.py --setting A B --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                 rope_theta=10000.0),
    # SmolLM2-135M's shape (random weights)
    "smollm2-135m": dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                         d_ff=1536, rope_theta=100000.0),
}
SETTINGS: Dict[str, Dict[str, int]] = {
    "A": dict(samples=16, prompt_len=59, traj_len=20, suffix_len=10),
    "B": dict(samples=16, prompt_len=30, traj_len=20, suffix_len=0),
}


def build(args: argparse.Namespace, setting: Dict[str, int]) -> Dict[str, Any]:
    """Model, adapters, batch and the jitted functions of both paths for one setting."""
    import jax
    import jax.numpy as jnp

    from gfn_jax.logprobs import PolicySpec
    from gfn_jax.models.config import ModelConfig
    from gfn_jax.models.lora import LoraConfig, init_lora
    from gfn_jax.models.transformer import init_params
    from gfn_jax.objectives import default_state_mask, subtb_loss
    from gfn_jax.scoring import score_policy, score_reward_prefixes, score_suffix_prefixes

    K, X, T, S = (setting[k] for k in ("samples", "prompt_len", "traj_len", "suffix_len"))
    cfg = ModelConfig(family="llama", max_seq_len=2048, tie_embeddings=True,
                      dtype="float32", param_dtype="float32", **PRESETS[args.preset])
    params = init_params(cfg, jax.random.PRNGKey(0))
    lcfg = LoraConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank,
                      targets=(r"layers/attn/(q|k|v|o)/kernel",))
    ad = init_lora(cfg, params, lcfg, jax.random.PRNGKey(1))
    keys = iter(jax.random.split(jax.random.PRNGKey(2), 64))
    tree = jax.tree_util.tree_map_with_path(  # b != 0 so that the adapters matter
        lambda p, x: 0.01 * jax.random.normal(next(keys), x.shape)
        if jax.tree_util.keystr(p).endswith("['b']") else x, ad["tree"])
    scale = float(ad["scale"])
    V = cfg.vocab_size
    term = V - 1
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, V - 1, (1, X))
    batch = {
        "prompt_tokens": jnp.asarray(np.repeat(prompt, K, 0), jnp.int32),
        "prompt_mask": jnp.ones((K, X), jnp.int32),
        "tokens": jnp.asarray(rng.integers(0, V - 1, (K, T)), jnp.int32),
        "lengths": jnp.asarray(np.r_[T, rng.integers(1, T + 1, K - 1)], jnp.int32),
    }
    if S:
        batch["suffix_tokens"] = jnp.asarray(np.repeat(rng.integers(0, V - 1, (1, S)), K, 0),
                                             jnp.int32)
        batch["suffix_mask"] = jnp.ones((K, S), bool)
    spec = PolicySpec((term,), max_len=T, min_len=0)

    def reward(params, b, k):
        r = score_reward_prefixes(cfg, params, b["prompt_tokens"], b["prompt_mask"],
                                  b["tokens"], b["lengths"], (term,), group_size=k)
        log_r = r.log_pz + r.log_pterm
        if S:
            log_r = log_r + score_suffix_prefixes(
                cfg, params, b["prompt_tokens"], b["prompt_mask"], b["tokens"], b["lengths"],
                b["suffix_tokens"], b["suffix_mask"], group_size=k)
        return log_r

    def policy(tree, params, b, k):
        return score_policy(cfg, params, b["prompt_tokens"], b["prompt_mask"], b["tokens"],
                            b["lengths"], spec, group_size=k,
                            adapters={"scale": jnp.float32(scale), "tree": tree})

    def loss(tree, params, b, k):
        pol = policy(tree, params, b, k)
        log_r = jax.lax.stop_gradient(reward(params, b, k))
        smask = default_state_mask(b["lengths"], T)
        value, _ = subtb_loss(pol.log_pf, pol.log_pterm, log_r, smask)
        return value, (pol.log_pf, pol.log_pterm, log_r)

    def pol_loss(tree, params, b, k):
        pol = policy(tree, params, b, k)
        return jnp.sum(pol.log_pf) + jnp.sum(pol.log_pterm)

    fns: Dict[str, Dict[str, Callable]] = {}
    for name, k in (("old", 1), ("new", K)):
        fns[name] = {
            "step": jax.jit(jax.value_and_grad(lambda t, p, b, k=k: loss(t, p, b, k),
                                               has_aux=True)),
            "policy": jax.jit(jax.value_and_grad(lambda t, p, b, k=k: pol_loss(t, p, b, k))),
            "reward": jax.jit(lambda p, b, k=k: reward(p, b, k)),
        }
    return dict(cfg=cfg, params=params, tree=tree, batch=batch, fns=fns)


def _call(fns: Dict[str, Callable], what: str, tree: Any, params: Any, batch: Any) -> Any:
    import jax

    out = fns[what](params, batch) if what == "reward" else fns[what](tree, params, batch)
    return jax.block_until_ready(out)


def check(b: Dict[str, Any]) -> Dict[str, float]:
    """Largest |old - new| of the loss, log-probs, log R and LoRA gradients (float32)."""
    import jax

    (l0, a0), g0 = _call(b["fns"]["old"], "step", b["tree"], b["params"], b["batch"])
    (l1, a1), g1 = _call(b["fns"]["new"], "step", b["tree"], b["params"], b["batch"])
    def md(x: Any, y: Any) -> float:
        pairs = zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y))
        return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in pairs)

    gmax = max(float(np.max(np.abs(np.asarray(u)))) for u in jax.tree_util.tree_leaves(g0))
    return {"loss_old": float(l0), "loss_new": float(l1), "loss": abs(float(l0) - float(l1)),
            "log_pf": md(a0[0], a1[0]), "log_pterm": md(a0[1], a1[1]), "log_r": md(a0[2], a1[2]),
            "grad": md(g0, g1), "grad_max": gmax}


def temp_bytes(b: Dict[str, Any], what: str) -> Dict[str, float]:
    """XLA's planned temporary memory (``memory_analysis``) of one function, both paths."""
    out = {}
    for name in ("old", "new"):
        f = b["fns"][name][what]
        args = (b["params"], b["batch"]) if what == "reward" else (b["tree"], b["params"],
                                                                   b["batch"])
        out[name] = float(f.lower(*args).compile().memory_analysis().temp_size_in_bytes)
    return out


def time_side_by_side(b: Dict[str, Any], what: str, rounds: int, warmup: int) -> Dict[str, Any]:
    """Alternating timings (old new / new old / ...) of one function of both paths."""
    times: Dict[str, List[float]] = {"old": [], "new": []}
    compile_s = {}
    for name in ("old", "new"):
        t0 = time.perf_counter()
        _call(b["fns"][name], what, b["tree"], b["params"], b["batch"])
        compile_s[name] = time.perf_counter() - t0
    for _ in range(warmup):
        for name in ("old", "new"):
            _call(b["fns"][name], what, b["tree"], b["params"], b["batch"])
    for r in range(rounds):
        for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
            t0 = time.perf_counter()
            _call(b["fns"][name], what, b["tree"], b["params"], b["batch"])
            times[name].append(time.perf_counter() - t0)
    ratios = [o / n for o, n in zip(times["old"], times["new"])]
    return {"old_ms": [1e3 * t for t in times["old"]], "new_ms": [1e3 * t for t in times["new"]],
            "old_median_ms": 1e3 * statistics.median(times["old"]),
            "new_median_ms": 1e3 * statistics.median(times["new"]),
            "speedup_median": statistics.median(ratios), "speedup_min": min(ratios),
            "speedup_max": max(ratios), "first_call_s": compile_s}


def main(argv: List[str] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="smollm2-135m", choices=sorted(PRESETS))
    p.add_argument("--setting", nargs="+", default=["A", "B"], choices=sorted(SETTINGS))
    p.add_argument("--what", nargs="+", default=["step"], choices=["step", "policy", "reward"],
                   help="which functions to time (default: the whole loss + gradient)")
    p.add_argument("--rounds", type=int, default=5, help="alternating timed rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds after compiling")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--memory", action="store_true",
                   help="also print XLA's planned temporary memory of each function")
    p.add_argument("--json", default="", help="write every figure to this file")
    args = p.parse_args(argv)

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    dev = jax.devices()[0]
    out: Dict[str, Any] = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "device": f"{dev.platform}: {getattr(dev, 'device_kind', '')}",
        "cpu_count": os.cpu_count(), "jax": jax.__version__, "python": platform.python_version(),
        "load_average_start": os.getloadavg(), "preset": args.preset, "lora_rank": args.lora_rank,
        "settings": {}}
    print(f"# {out['device']}, JAX {jax.__version__}, {os.cpu_count()} CPUs, load average "
          f"{out['load_average_start'][0]:.2f}; preset {args.preset}, float32, LoRA r="
          f"{args.lora_rank} on q,k,v,o")
    for name in args.setting:
        setting = SETTINGS[name]
        b = build(args, setting)
        res: Dict[str, Any] = {"setting": setting, "check": check(b)}
        c = res["check"]
        print(f"\nsetting {name}: {setting['samples']} samples of one prompt, |X|="
              f"{setting['prompt_len']}, |Z|={setting['traj_len']}, |Y|={setting['suffix_len']}")
        print(f"  float32 check old vs new: loss {c['loss_old']:.6f} vs {c['loss_new']:.6f}; "
              f"max |diff| log q {c['log_pf']:.1e}, log q(T) {c['log_pterm']:.1e}, log R "
              f"{c['log_r']:.1e}, LoRA grads {c['grad']:.1e} (largest grad {c['grad_max']:.2e})")
        print("  | function | row by row, median ms | shared prompt, median ms | speed-up "
              "(median of per-round ratios, min..max) |")
        print("  |---|---:|---:|---:|")
        for what in args.what:
            t = time_side_by_side(b, what, args.rounds, args.warmup)
            res[what] = t
            print(f"  | {what} | {t['old_median_ms']:.1f} | {t['new_median_ms']:.1f} | "
                  f"{t['speedup_median']:.2f}x ({t['speedup_min']:.2f}..{t['speedup_max']:.2f}) |")
        for what in args.what if args.memory else ():
            m = temp_bytes(b, what)
            res[what]["temp_bytes"] = m
            print(f"  {what}: XLA temporaries {m['old'] / 2**20:.1f} MiB row by row, "
                  f"{m['new'] / 2**20:.1f} MiB shared")
        out["settings"][name] = res
        del b
    out["load_average_end"] = os.getloadavg()
    print(f"\nload average at the end: {out['load_average_end'][0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
