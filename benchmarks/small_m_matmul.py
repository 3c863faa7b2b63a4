"""How fast this CPU multiplies a decode step's few rows by its weights, in each layout.

A sampler's decode step multiplies B rows (16 here) by every weight matrix once; at such a
small M the matmul kernels, not the FLOPs or the bytes, set the step's time. This times the
30 layers' projections of SmolLM2-135M (q, k, v, o, gate, up, down: random float32 weights
of the real shapes, jitted together, best of ``--reps`` calls) as

* ``x @ W`` with W stored [K, N] (the library's layout),
* ``x @ W.T`` with W stored [N, K] (PyTorch's layout),
* ``W @ x.T`` with W stored [N, K] (feature-major activations),

beside a 1024^3 matmul (the rate a large matmul reaches), the time to stream the same
weights once (a jitted sum over them) and numpy's ``x @ W``; then a whole Llama-style decode
step of the same shapes (RMS norms, attention over a 79-slot cache, SwiGLU, tied vocabulary
projection) written batch-major and feature-major (the activations transposed around the
attention only), to see whether the feature-major matmuls' speed survives in a real step.
Prints one line per figure:

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
    _whole_step(args.rows, args.layers, best)


def _whole_step(B: int, L: int, best) -> None:
    """One decode step of SmolLM2-135M's shapes, batch-major vs feature-major."""
    import jax
    import jax.numpy as jnp

    D, F, H, K, Dh, S, V = 576, 1536, 9, 3, 64, 79, 49152
    rng = np.random.default_rng(1)

    def r(*shape):
        return rng.standard_normal(shape, dtype=np.float32) * 0.02

    names = {"q": (D, H * Dh), "k": (D, K * Dh), "v": (D, K * Dh), "o": (H * Dh, D),
             "g": (D, F), "u": (D, F), "d": (F, D)}
    host = [{n: r(*sh) for n, sh in names.items()} for _ in range(L)]
    lay = [{n: jnp.asarray(w) for n, w in layer.items()} for layer in host]
    lay_t = [{n: jnp.asarray(np.ascontiguousarray(w.T)) for n, w in layer.items()}
             for layer in host]
    emb = jnp.asarray(r(V, D))
    ck = [jnp.asarray(r(B, S, K, Dh)) for _ in range(L)]
    cv = [jnp.asarray(r(B, S, K, Dh)) for _ in range(L)]
    x0 = jnp.asarray(r(B, D) * 50)
    idx = jnp.int32(60)

    def attend(q, k, v, ck, cv):  # q [B, H*Dh], k/v [B, K*Dh]
        ck = jax.lax.dynamic_update_slice_in_dim(ck, k.reshape(B, 1, K, Dh), idx, 1)
        cv = jax.lax.dynamic_update_slice_in_dim(cv, v.reshape(B, 1, K, Dh), idx, 1)
        s = jnp.einsum("bkgd,bskd->bkgs", q.reshape(B, K, H // K, Dh), ck) / np.sqrt(Dh)
        out = jnp.einsum("bkgs,bskd->bkgd", jax.nn.softmax(s, -1), cv)
        return out.reshape(B, H * Dh), ck, cv

    def rms(x, axis):
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis, keepdims=True) + 1e-5)

    def batch_major(lay, ck, cv, x):
        new = []
        for w, a, b in zip(lay, ck, cv):
            h = rms(x, -1)
            o, a, b = attend(h @ w["q"], h @ w["k"], h @ w["v"], a, b)
            x = x + o @ w["o"]
            h = rms(x, -1)
            x = x + (jax.nn.silu(h @ w["g"]) * (h @ w["u"])) @ w["d"]
            new.append((a, b))
        return x @ emb.T, new

    def feature_major(lay, ck, cv, x):
        xt, new = x.T, []
        for w, a, b in zip(lay, ck, cv):
            h = rms(xt, 0)
            o, a, b = attend((w["q"] @ h).T, (w["k"] @ h).T, (w["v"] @ h).T, a, b)
            xt = xt + w["o"] @ o.T
            h = rms(xt, 0)
            xt = xt + w["d"] @ (jax.nn.silu(w["g"] @ h) * (w["u"] @ h))
            new.append((a, b))
        return (emb @ xt).T, new

    fb, ff = jax.jit(batch_major), jax.jit(feature_major)
    diff = float(jnp.max(jnp.abs(fb(lay, ck, cv, x0)[0] - ff(lay_t, ck, cv, x0)[0])))
    tb = best(fb, lay, ck, cv, x0)
    tf = best(ff, lay_t, ck, cv, x0)
    print(f"whole decode step ({L} layers, {B} rows, cache {S}): batch-major {tb * 1e3:.1f} ms, "
          f"feature-major {tf * 1e3:.1f} ms (max |logit difference| {diff:.1e})")


if __name__ == "__main__":
    main()
