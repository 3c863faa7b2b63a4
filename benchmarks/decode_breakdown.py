"""Where a decode step of the sampler goes, on SmolLM2-135M (float32, no adapters).

Times, each jitted alone (median of ``--reps`` calls after a warm-up): the prompt prefill;
one ``decode_step`` for 1, 4, 16 and 32 rows against a cache of P + T slots in the stacked
layout (the layers under ``lax.scan``: every step slices each layer's weights out of the
stacks; jitted alone without donation, the call also copies the cache it returns) and in
the decoders' per-layer layout
(``decode_layout``: layers unrolled, weights read in place, each layer's cache donated and
updated in place), plain and feature-major (``feature_major=True``: projections stored
[out, in] and run as ``(W @ x.T).T``, CPU's default for few rows); the vocabulary
projection, both ways; the sampler's log-prob heads with
``jax.random.categorical`` and with its inverse-CDF ``draw``; and the matmuls of one decode
step's shapes alone (16 rows) with numpy beside them. The share of CPU time the hypervisor
stole during the run (``/proc/stat``) is printed last: on a shared VM it is what makes
single figures noisy. Prints one line per figure:

    python benchmarks/decode_breakdown.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from timing import median_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--prompt", type=int, default=59)
    ap.add_argument("--new", type=int, default=20)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from gfn_jax.baselines import hardware
    from gfn_jax.logprobs import PolicySpec, constrain_logits, policy_logprobs
    from gfn_jax.models import registry
    from gfn_jax.models import transformer as tf
    from gfn_jax.sampling import _repeat_cache, behaviour_logprobs, draw

    s0 = _cpu_ticks()
    m = registry.load("smollm2-135m", dtype="float32")
    cfg, params = m.config, m.params
    P, T = args.prompt, args.new
    print(f"# {hardware()}; SmolLM2-135M float32, prompt {P}, cache {P + T} slots")

    def ms(f, *a) -> float:
        return median_ms(args.reps, f, *a)

    toks = jnp.asarray(np.random.default_rng(0).integers(100, 1000, (1, P)), jnp.int32)
    pf = jax.jit(lambda p, t: tf.prefill(cfg, p, t, jnp.ones_like(t), P + T, last_only=True))
    print(f"prefill (1 prompt): {ms(pf, params, toks):.1f} ms")
    _, cache1 = pf(params, toks)
    step = jax.jit(lambda p, c, tok: tf.decode_step(cfg, p, c, tok))
    layout = jax.jit(lambda p, c, fm: tf.decode_layout(p, c, feature_major=fm)[:2],
                     static_argnums=2)
    per_layer = jax.jit(lambda p, c, tok: tf.decode_step(cfg, p, c, tok), donate_argnums=1)

    def ms_donated(lp, c):  # the per-layer cache is donated: each call feeds the next its output
        tok = jnp.full((c.valid.shape[0],), 5, jnp.int32)
        c = jax.block_until_ready(per_layer(lp, c, tok)[1])  # compile + warm-up, waited for
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            lg, c = per_layer(lp, c, tok)
            jax.block_until_ready(lg)
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3

    for rows in (1, 4, 16, 32):
        c = _repeat_cache(cache1, rows)
        tok = jnp.full((rows,), 5, jnp.int32)
        stacked = ms(step, params, c, tok)
        lp, lc = layout(params, c, False)
        plain = ms_donated(lp, lc)
        del lp, lc
        lp, lc = layout(params, c, True)
        print(f"decode_step, {rows} rows: stacked layout {stacked:.1f} ms, "
              f"per-layer layout {plain:.1f} ms, per-layer feature-major "
              f"{ms_donated(lp, lc):.1f} ms")
        del lp, lc
    K = 16
    h = jnp.ones((K, cfg.d_model), jnp.float32)
    fm_params = dict(params, **{tf.FM_MARK: {}})  # what the feature-major layout adds
    print(f"vocabulary projection, {K} rows: "
          f"{ms(jax.jit(lambda p, x: tf.unembed(cfg, p, x)), params, h):.1f} ms, "
          f"feature-major {ms(jax.jit(lambda p, x: tf.unembed(cfg, p, x)), fm_params, h):.1f} ms")
    spec = PolicySpec(term_ids=(30,), max_len=T, min_len=T)

    def heads(lg, rng, sampler):
        lp_tok, lp_term = policy_logprobs(lg, jnp.int32(3), spec, None)
        beh = behaviour_logprobs(constrain_logits(lg, jnp.int32(3), spec, None))
        return lp_tok, lp_term, sampler(rng, beh)

    lg = jax.random.normal(jax.random.PRNGKey(1), (K, cfg.vocab_size), jnp.float32) * 3
    for name, sampler in (("jax.random.categorical", lambda r, x: jax.random.categorical(r, x)),
                          ("inverse-CDF draw", draw)):
        f = jax.jit(lambda x, r, sampler=sampler: heads(x, r, sampler))
        print(f"log-prob heads + {name}, {K} rows: {ms(f, lg, jax.random.PRNGKey(0)):.1f} ms")
    D, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    Hq, Hk = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = [(D, Hq), (D, Hk), (D, Hk), (Hq, D), (D, F), (D, F), (F, D)]
    total_jax = total_np = 0.0
    mm = jax.jit(lambda a, b: a @ b)
    for k, n in shapes:
        a, b = jnp.ones((K, k), jnp.float32), jnp.ones((k, n), jnp.float32)
        total_jax += ms(mm, a, b)
        an, bn = np.ones((K, k), np.float32), np.ones((k, n), np.float32)
        t = time.perf_counter()
        for _ in range(args.reps):
            an @ bn
        total_np += (time.perf_counter() - t) / args.reps * 1e3
    a, b = jnp.ones((K, D), jnp.float32), jnp.ones((D, V), jnp.float32)
    vj = ms(mm, a, b)
    an, bn = np.ones((K, D), np.float32), np.ones((D, V), np.float32)
    t = time.perf_counter()
    for _ in range(args.reps):
        an @ bn
    vn = (time.perf_counter() - t) / args.reps * 1e3
    L = cfg.n_layers
    print(f"matmuls of one decode step alone, {K} rows: jax {L * total_jax + vj:.1f} ms "
          f"({L} layers x {total_jax:.2f} + vocabulary {vj:.1f}), numpy "
          f"{L * total_np + vn:.1f} ms")
    big = jnp.ones((1024, 1024), jnp.float32)
    t_big = ms(mm, big, big)
    print(f"1024^3 float32 matmul: {t_big:.2f} ms ({2 * 1024 ** 3 / t_big / 1e6:.0f} GFLOP/s)")
    s1 = _cpu_ticks()
    if s0 and s1:
        print(f"CPU time stolen by the hypervisor during the run: "
              f"{100 * (s1[0] - s0[0]) / max(1, s1[1] - s0[1]):.0f}%")


def _cpu_ticks():
    """(steal ticks, all ticks) from /proc/stat, or None where it does not exist."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[7], sum(v)
    except (OSError, IndexError, ValueError):
        return None


if __name__ == "__main__":
    main()
