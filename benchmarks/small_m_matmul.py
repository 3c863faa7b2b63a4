"""How fast this CPU multiplies a decode step's few rows by its weights, in each layout.

A sampler's decode step multiplies B rows (16 here) by every weight matrix once; at such a
small M the matmul kernels, not the FLOPs or the bytes, set the step's time. This times the
30 layers' projections of SmolLM2-135M (q, k, v, o, gate, up, down: random float32 weights
of the real shapes, jitted together, best of ``--reps`` calls) as

* ``x @ W`` with W stored [K, N] (the library's layout),
* ``x @ W.T`` with W stored [N, K] (PyTorch's layout),
* ``W @ x.T`` with W stored [N, K] (feature-major activations),

beside a 1024^3 matmul (the rate a large matmul reaches), the time to stream the same
weights once (a jitted sum over them) and numpy's ``x @ W``. Prints one line per figure:

    python benchmarks/small_m_matmul.py [--rows 16] [--reps 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=30)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from gfn_jax.baselines import hardware

    D, F, KV = 576, 1536, 192  # SmolLM2-135M: d_model, d_ff, n_kv_heads * head_dim
    shapes = [(D, D), (D, KV), (D, KV), (D, D), (D, F), (D, F), (F, D)] * args.layers
    rng = np.random.default_rng(0)
    w_kn = [rng.standard_normal(s, dtype=np.float32) * 0.02 for s in shapes]
    nbytes = sum(w.nbytes for w in w_kn)
    flops = 2 * args.rows * sum(w.size for w in w_kn)
    print(f"# {hardware()}; {len(shapes)} matrices ({nbytes / 1e6:.0f} MB float32), "
          f"{args.rows} rows, {flops / 1e9:.2f} GFLOP")

    def best(f, *a) -> float:
        jax.block_until_ready(f(*a))
        ts = []
        for _ in range(args.reps):
            t = time.perf_counter()
            jax.block_until_ready(f(*a))
            ts.append(time.perf_counter() - t)
        return min(ts)

    def line(name: str, dt: float) -> None:
        print(f"{name}: {dt * 1e3:.1f} ms, {flops / dt / 1e9:.1f} GFLOP/s, "
              f"{nbytes / dt / 1e9:.1f} GB/s of weights")

    W = [jnp.asarray(w) for w in w_kn]
    WT = [jnp.asarray(np.ascontiguousarray(w.T)) for w in w_kn]
    # each matrix gets an input of its own K (the real step chains them; here they are
    # independent so that only the matmuls are timed)
    xs = {k: jnp.asarray(rng.standard_normal((args.rows, k), dtype=np.float32))
          for k in {s[0] for s in shapes}}
    xts = {k: x.T for k, x in xs.items()}
    line("x @ W, W [K, N] (ours)",
         best(jax.jit(lambda ws: [xs[w.shape[0]] @ w for w in ws]), W))
    line("x @ W.T, W [N, K] (PyTorch's layout)",
         best(jax.jit(lambda ws: [xs[w.shape[1]] @ w.T for w in ws]), WT))
    line("W @ x.T, W [N, K] (feature-major)",
         best(jax.jit(lambda ws: [w @ xts[w.shape[1]] for w in ws]), WT))
    t = best(jax.jit(lambda ws: [jnp.sum(w) for w in ws]), W)
    print(f"stream the weights once (jitted sums): {t * 1e3:.1f} ms, {nbytes / t / 1e9:.1f} GB/s")
    xn = {k: np.asarray(x) for k, x in xs.items()}
    t0 = time.perf_counter()
    for _ in range(args.reps):
        for w in w_kn:
            xn[w.shape[0]] @ w
    line("numpy x @ W", (time.perf_counter() - t0) / args.reps)
    a = jnp.asarray(rng.standard_normal((1024, 1024), dtype=np.float32))
    t = best(jax.jit(lambda a: a @ a), a)
    print(f"1024^3 float32 matmul: {t * 1e3:.2f} ms ({2 * 1024 ** 3 / t / 1e9:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
