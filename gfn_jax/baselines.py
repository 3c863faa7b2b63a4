"""Decoding baselines on a task's evaluation prompts, scored with the task's own metrics.

The paper compares the GFlowNet-tuned policy with decoding methods applied to the base model
(Sec. 4.1): greedy, beam search with n and 5n beams (the n best kept), diverse beam search
(penalty 1.0), nucleus sampling (p = 0.95), pure sampling and tempered sampling. Each runs
here through :mod:`gfn_jax.decoding` on the same constrained policy (the task's termination
set, length limits and logit bias) and returns the sample-dict format every
``Task.evaluate`` takes (``prompt``, ``text``, ``tokens``, ``log_q``, plus ``method``);
:func:`evaluate_methods` scores all methods into one table (a dict of metrics per method).

Command line (the base model of a config; results for ``gfn-jax report``)::

    python -m gfn_jax.baselines --config configs/continuation.py --out runs/baselines/continuation
    python -m gfn_jax.baselines --config configs/infill_stories.py --out runs/baselines/stories \\
        --n 8 --methods sample,beam_n,nucleus

writes ``baselines.json`` ({method: metrics}), ``samples_<method>.jsonl`` and ``run.json``
(command, hardware, wall time) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gfn_jax import decoding

__all__ = ["METHODS", "decode", "run_methods", "evaluate_methods", "main"]

METHODS = ("greedy", "beam_n", "beam_5n", "diverse_beam", "nucleus", "sample", "tempered")
"""Method names: ``beam_n`` / ``beam_5n`` keep the n best of n / 5n beams; ``diverse_beam``
has n groups of one beam (Hamming penalty ``diversity``); ``nucleus`` p = ``top_p``;
``tempered`` samples at ``temperature``."""


def _records(policy: Any, prompt: str, out: decoding.DecodeOutput, method: str
             ) -> List[Dict[str, Any]]:
    out = jax.device_get(out)
    recs = []
    for j in range(out.tokens.shape[1]):
        score = float(out.scores[0, j])
        if not np.isfinite(score):  # an empty beam slot (fewer distinct sequences)
            continue
        n = int(out.lengths[0, j])
        toks = np.asarray(out.tokens[0, j, :n]).tolist()
        recs.append({"prompt": prompt, "text": policy.tokenizer.decode(toks), "tokens": toks,
                     "log_q": score, "method": method})
    return recs


def decode(policy: Any, prompts: Sequence[str], method: str, n: int, *, seed: int = 0,
           temperature: float = 0.8, top_p: float = 0.95, diversity: float = 1.0
           ) -> List[Dict[str, Any]]:
    """``method`` on each prompt with the policy's model, adapters, bias and spec: up to
    ``n`` samples per prompt (greedy: 1), as sample dicts; ``log_q`` is log q(Z⊤|X) under the
    untempered policy. One jitted decoder call per prompt, every prompt left-padded to the
    same length (one compile per method)."""
    if method not in METHODS:
        raise ValueError(f"unknown decoding method {method!r}; choose from {', '.join(METHODS)}")
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    cfg, spec = policy.model_config, policy.spec
    policy = policy.for_decoding(len(prompts), int(n))  # one decoder call per prompt
    common = dict(logit_bias=policy.logit_bias, adapters=policy.adapters, pad_id=policy.pad_id,
                  decode_weights=policy.decode_weights)
    key = jax.random.PRNGKey(seed)
    out: List[Dict[str, Any]] = []
    encoded = policy.encode(prompts)
    P = max(len(x) for x in encoded)
    P = min(-(-P // 16) * 16, policy.max_prompt_len)  # one compile for prompts of similar length
    for p, ids in zip(prompts, encoded):
        pt, pm = (jnp.asarray(x) for x in policy.pad([ids], P))
        key, sub = jax.random.split(key)
        if method == "greedy":
            d = decoding.greedy(cfg, policy.params, pt, pm, spec, **common)
        elif method in ("beam_n", "beam_5n"):
            beams = n if method == "beam_n" else 5 * n
            d = decoding.beam_search(cfg, policy.params, pt, pm, spec, num_beams=beams,
                                     num_return=n, **common)
        elif method == "diverse_beam":
            d = decoding.diverse_beam_search(cfg, policy.params, pt, pm, spec, num_beams=n,
                                             num_groups=n, num_return=n,
                                             diversity_strength=diversity, **common)
        elif method == "nucleus":
            d = decoding.sample_nucleus(cfg, policy.params, sub, pt, pm, spec, p=top_p,
                                        num_samples=n, **common)
        elif method == "sample":
            d = decoding.sample_pure(cfg, policy.params, sub, pt, pm, spec, num_samples=n,
                                     **common)
        else:
            d = decoding.sample_tempered(cfg, policy.params, sub, pt, pm, spec,
                                         temperature=temperature, num_samples=n, **common)
        out += _records(policy, p, d, method)
    return out


def run_methods(policy: Any, prompts: Sequence[str], n: int,
                methods: Sequence[str] = METHODS, **kw: Any) -> Dict[str, List[Dict[str, Any]]]:
    """{method: samples} for each method (see :func:`decode` for ``kw``)."""
    policy = policy.for_decoding(len(prompts) * len(methods), int(n))
    return {m: decode(policy, prompts, m, n, **kw) for m in methods}


def evaluate_methods(task: Any, samples_by_method: Dict[str, List[Dict[str, Any]]],
                     out_dir: Optional[str] = None) -> Dict[str, Dict[str, float]]:
    """One table: ``{method: task.evaluate(samples)}`` (plus ``eval_time_s``)."""
    table: Dict[str, Dict[str, float]] = {}
    for m, samples in samples_by_method.items():
        t0 = time.time()
        table[m] = dict(task.evaluate(samples, out_dir=out_dir, tag=f"baseline_{m}"))
        table[m]["eval_time_s"] = time.time() - t0
    return table


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The host CPU's model name and widest x86 vector extension (``"AMD EPYC, avx2"``),
    from ``/proc/cpuinfo``; ``platform.processor()`` elsewhere. CPU timings depend on both
    (XLA's CPU code generation uses AVX-512 where the host has it)."""
    try:
        with open(cpuinfo) as f:
            text = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    name, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not name:
            name = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    isa = next((f for f in ("avx512f", "avx2", "avx", "sse4_2") if f in flags), "")
    return ", ".join(x for x in (name or platform.machine(), isa) if x)


def hardware() -> str:
    """A one-line description of the machine and JAX devices."""
    devs = jax.devices()
    kinds = sorted({d.device_kind for d in devs})
    return (f"{platform.node()}: {len(devs)} x {'/'.join(kinds)} ({jax.default_backend()}), "
            f"{os.cpu_count()} CPU cores ({cpu_model()}), JAX {jax.__version__}")


def _load(config_path: str, overrides: Sequence[str]):
    import runpy

    from gfn_jax.defaults import validate_config
    from gfn_jax.models import registry
    from gfn_jax.policy import load_base_model, policy_from_task
    from gfn_jax.tasks import make_task

    config = runpy.run_path(config_path)["get_config"]()
    for o in overrides:  # KEY=VALUE, e.g. task.num_eval=10
        k, _, v = o.partition("=")
        node, *path = k.split(".")
        tgt = config[node]
        for part in path[:-1]:
            tgt = tgt[part]
        cur = tgt[path[-1]]
        tgt[path[-1]] = type(cur)(json.loads(v)) if not isinstance(cur, str) else v
    validate_config(config)
    task = make_task(config.task, data_root=config.data.root)
    cfg, params, tok = load_base_model(config, task)
    task.setup(cfg, tok)
    reward_params = params
    if config.reward.model:
        reward_params = registry.load(config.reward.model, dtype=config.model.param_dtype).params
    task.bind_reward_params(reward_params)
    return config, task, policy_from_task(task, cfg, params, None, tok)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gfn_jax.baselines",
                                description="Decoding baselines on a config's base model and "
                                            "held-out prompts, scored with the task's metrics.")
    p.add_argument("--config", required=True, help="a configs/*.py file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=int, default=8, help="samples (beams) per prompt")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--num_prompts", type=int, default=0, help="first N eval prompts (0 = all)")
    p.add_argument("--temperature", type=float, default=0.8, help="tempered sampling")
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--diversity", type=float, default=1.0, help="diverse beam penalty")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set task.num_eval=10 (repeatable)")
    a = p.parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    t0 = time.time()
    config, task, policy = _load(a.config, a.set)
    prompts = list(task.eval_prompts())
    if a.num_prompts:
        prompts = prompts[: a.num_prompts]
    os.makedirs(a.out, exist_ok=True)
    samples = run_methods(policy, prompts, a.n, methods, seed=a.seed,
                          temperature=a.temperature, top_p=a.top_p, diversity=a.diversity)
    for m, s in samples.items():
        with open(os.path.join(a.out, f"samples_{m}.jsonl"), "w") as f:
            for r in s:
                f.write(json.dumps(r) + "\n")
    table = evaluate_methods(task, samples, a.out)
    with open(os.path.join(a.out, "baselines.json"), "w") as f:
        json.dump(table, f, indent=2)
    meta = {"command": " ".join(["python -m gfn_jax.baselines"] + list(
                sys.argv[1:] if argv is None else argv)),
            "hardware": hardware(), "wall_time_s": time.time() - t0, "task": config.task.name,
            "model": config.model.spec, "n": a.n, "num_prompts": len(prompts),
            "temperature": a.temperature, "top_p": a.top_p, "diversity": a.diversity,
            "config": config.to_dict()}
    with open(os.path.join(a.out, "run.json"), "w") as f:
        json.dump(meta, f, indent=2, default=str)
    print(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
