"""How long fetching a step's metrics to the host takes with several processes:
``jax.experimental.multihost_utils.process_allgather`` (one program and one collective per
leaf) against ``gfn_jax.parallel.to_host`` (replicated leaves read locally, the rest in one
program).

Starts ``--processes`` localhost processes with the multi-process tests' launcher
(``tests/multiproc.py``: ``jax.distributed`` over gloo, ``--devices`` CPU devices each, one
``data x fsdp x tensor`` mesh over all of them) and prints, per process, the median time of each way to fetch a dict of ``--metrics`` replicated scalars
(what a train step returns) and of a ``[rows]`` array sharded over the batch axes (what the
step's per-row log-rewards are)::

    python benchmarks/multihost_fetch.py            # 2 processes x 4 devices, 20 metrics
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(args: argparse.Namespace) -> None:
    import numpy as np

    from gfn_jax import parallel as par

    assert par.initialize_distributed()
    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    mesh = par.make_mesh(par.MeshConfig(data=-1))
    rows = 2 * jax.device_count()
    x = jax.device_put(jnp.arange(rows * 4, dtype=jnp.float32).reshape(rows, 4),
                       par.batch_sharding(mesh, 2))
    step = jax.jit(lambda x: ({f"m{i}": jnp.sum(x) * i for i in range(args.metrics)},
                              jnp.sum(x, axis=1)),
                   out_shardings=(par.replicated(mesh), par.batch_sharding(mesh, 1)))
    metrics, per_row = step(x)
    jax.block_until_ready((metrics, per_row))
    want = float(np.sum(np.arange(rows * 4)))
    ways = {"process_allgather": lambda t: multihost_utils.process_allgather(t, tiled=True),
            "to_host": par.to_host}
    res: Dict[str, Dict[str, float]] = {}
    for what, tree in (("metrics", metrics), ("metrics + per-row array", (metrics, per_row))):
        res[what] = {}
        for name, fn in ways.items():
            first = time.perf_counter()
            out = fn(tree)
            first = time.perf_counter() - first
            ts: List[float] = []
            for _ in range(args.reps):
                t = time.perf_counter()
                out = fn(tree)
                ts.append(time.perf_counter() - t)
            got = out if what == "metrics" else out[0]
            assert float(got["m1"]) == want, (name, got["m1"], want)
            if what != "metrics":
                assert np.asarray(out[1]).shape == (rows,)
            res[what][name] = float(np.median(ts))
            res[what][name + " (first call)"] = first
    print("RESULT " + json.dumps({"process": jax.process_index(), "results": res}), flush=True)
    jax.distributed.shutdown()


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--devices", type=int, default=4, help="CPU devices per process")
    p.add_argument("--metrics", type=int, default=20)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from multiproc import run_workers  # the launcher the multi-process tests use

    with tempfile.TemporaryDirectory() as logs:
        prefix = os.path.join(logs, "process")
        run_workers([os.path.abspath(__file__), "--worker", "--metrics", str(args.metrics),
                     "--reps", str(args.reps)], prefix, args.processes, args.devices, 600.0)
        outs = [open(f"{prefix}{pid}.log").read() for pid in range(args.processes)]
    results = [json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
               for out in outs]
    print(f"# {args.processes} processes x {args.devices} CPU devices (gloo), "
          f"{args.metrics} replicated scalar metrics, median of {args.reps} after the first call")
    print("| fetch | way | " + " | ".join(f"process {r['process']} ms" for r in results) + " |")
    print("|---|---|" + "---:|" * len(results))
    for what in results[0]["results"]:
        for way in results[0]["results"][what]:
            cells = " | ".join(f"{1000 * r['results'][what][way]:.2f}" for r in results)
            print(f"| {what} | {way} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
