"""The sampler on a data-parallel mesh: each row on one device (the trainer's policies sample
under its mesh, ``Policy.shard``) against every device sampling every row (what an unsharded
call over replicated weights does), side by side, alternating.

SmolLM2-135M (float32, no adapters), one prompt of ``--prompt`` random tokens, ``--rows``
samples, exactly ``--new`` new tokens, the weights replicated over ``--devices`` virtual CPU
devices on a ``data`` mesh (set before JAX starts). Prints each side's median call time, the
whether the two sides drew the same rows (up to float
rounding). On a CPU host the virtual devices share the cores: with as many devices as cores,
the split side does each core's share of the rows, the replicated side all of them on every
core.

    python benchmarks/sampler_rows_split.py                 # 2 devices, 32 rows x 20 tokens
    python benchmarks/sampler_rows_split.py --devices 8 --rows 64
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=2, help="virtual CPU devices (data axis)")
    ap.add_argument("--rows", type=int, default=32, help="samples of the prompt")
    ap.add_argument("--prompt", type=int, default=20, help="prompt tokens")
    ap.add_argument("--new", type=int, default=20, help="new tokens per sample (exactly)")
    ap.add_argument("--steps", type=int, default=5, help="timed calls per side after a warm-up")
    args = ap.parse_args()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

    import contextlib
    import statistics
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    from gfn_jax import parallel, sampling
    from gfn_jax.baselines import hardware
    from gfn_jax.logprobs import PolicySpec
    from gfn_jax.models import registry
    from gfn_jax.models.transformer import activation_sharding, param_axes

    m = registry.load("smollm2-135m", dtype="float32")
    mesh = parallel.make_mesh(parallel.MeshConfig(data=args.devices))
    rules = parallel.DEFAULT_RULES
    params = jax.device_put(m.params, parallel.tree_shardings(param_axes(m.config), m.params,
                                                              mesh, rules))
    P, T, K = args.prompt, args.new, args.rows
    toks = jnp.asarray([np.random.default_rng(0).integers(100, 1000, P).tolist()], jnp.int32)
    spec = PolicySpec(term_ids=(30,), max_len=T, min_len=T)

    def call(split: bool):
        with activation_sharding(mesh, rules) if split else contextlib.nullcontext():
            return sampling.sample(m.config, params, jax.random.PRNGKey(0), toks,
                                   jnp.ones_like(toks), spec, num_samples=K)

    sides = {"rows split": True, "every device, every row": False}
    outs = {name: jax.block_until_ready(call(split)) for name, split in sides.items()}
    times = {name: [] for name in sides}
    for i in range(args.steps):
        for name, split in sides.items():
            t = time.perf_counter()
            jax.block_until_ready(call(split))
            times[name].append(time.perf_counter() - t)
    a, b = (np.asarray(o.tokens) for o in outs.values())
    same = float((a == b).all(1).mean())
    print(f"# {hardware()}")
    print(f"# SmolLM2-135M float32, {args.devices} virtual CPU devices (data={args.devices}), "
          f"weights replicated; 1 prompt x {K} rows, {P} prompt tokens, {T} new tokens; median "
          f"of {args.steps} calls after a warm-up, sides alternating")
    print("| side | median ms | calls (ms) |\n|---|---:|---|")
    med = {}
    for name in sides:
        med[name] = statistics.median(times[name]) * 1e3
        print(f"| {name} | {med[name]:,.0f} | "
              f"{', '.join(f'{x * 1e3:,.0f}' for x in times[name])} |")
    names = list(sides)
    print(f"ratio (every row / split): {med[names[1]] / med[names[0]]:.2f}x; rows drawn alike "
          f"on both sides: {same:.0%}")


if __name__ == "__main__":
    main()
