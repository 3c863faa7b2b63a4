"""Where the time goes, kernel by kernel, in the sampler and in the train step's parts.

``--what sampler`` runs ``gfn_jax.sampling.sample`` on SmolLM2-135M (float32, no adapters;
16 samples of one 59-token prompt, exactly 20 new tokens, as in ``sampler_vs_generate.py``).
``--what policy`` / ``reward`` / ``step`` run the shared-prompt functions of
``bench_shared_prompt.py`` (SmolLM2-135M's shape, random weights, LoRA r = 64 on q, k, v, o)
for issue #10's setting A or B (``--setting``): the policy forward + backward, the reward
of every prefix (with the suffix scorer in A), or both with the SubTB loss.

Each is called once to compile, ``--calls`` times untimed, then ``--calls`` times under
``jax.profiler.trace``; the script reads the trace's Perfetto JSON, where XLA:CPU records
every kernel it runs (a loop fusion, a YNNPACK matmul fusion, a copy, ...) as a span on the
thread that ran it (``gfn_jax.profiling`` reads it). It prints the share of the wall time with at least one kernel running
("busy"; the rest is the runtime between kernels) and the span time per kernel kind; for
the sampler, split into the decode loop's kernels (run once per decode step) and those run
once per call (prefill, weight layout, heads). Spans of kernels running at the same time on
XLA's two threads add up, so sums can exceed the wall time; a YNNPACK matmul is one span on
one XLA thread even when the library's own worker threads run it on both cores, so the
script also prints the process's CPU time over the wall time ("cores in use").

    python benchmarks/kernel_profile.py --what sampler
    python benchmarks/kernel_profile.py --what policy reward --setting A
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import tempfile
import time
from typing import Dict, List, Tuple

import numpy as np

from gfn_jax.hostmem import process_usage, usage_since
from gfn_jax.profiling import Span, busy_time, kernel_spans, summarize


def profile(call, calls: int, trace_dir: str
            ) -> Tuple[List[float], List[float], List[Span], float]:
    """(untraced walls, traced walls, kernel spans, cores in use) of ``calls`` calls after a
    compiling one; cores in use = the process's CPU time over the untraced calls' wall time
    (the matmul library's own worker threads count there, though not as spans)."""
    call(0)
    untraced = []
    u0 = process_usage()
    for i in range(calls):
        t = time.perf_counter()
        call(i)
        untraced.append(time.perf_counter() - t)
    used = usage_since(u0)
    cpu = used["user_cpu_s"] + used["system_cpu_s"]
    import jax

    walls = []
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for i in range(calls):
            t = time.perf_counter()
            call(i)
            walls.append(time.perf_counter() - t)
    return untraced, walls, kernel_spans(trace_dir), cpu / max(sum(untraced), 1e-9)


def table(groups, top: int) -> None:
    """Markdown rows: per group (label, spans, divisor), the ``top`` kinds by span time."""
    print("\n| kernels | kind | count | span ms, summed over threads |\n|---|---|---:|---:|")
    for label, group, per in groups:
        for t in summarize(group, 0.0, calls=per, top=top)["top"]:
            print(f"| {label} | `{t['kind']}` | {t['count']:.0f} | {t['ms']:.1f} |")


def summary(what: str, untraced, walls, spans, n: int, cores: float) -> None:
    wall_ms = statistics.median(walls) * 1e3
    busy = busy_time(spans) / 1e3
    print(f"\n## {what}: wall per call {wall_ms:.0f} ms traced, "
          f"{statistics.median(untraced) * 1e3:.0f} ms untraced; a kernel running "
          f"{100 * busy / (sum(walls) * 1e3):.0f}% of the wall; kernel spans "
          f"{sum(s[2] for s in spans) / n / 1e3:.0f} ms per call; {cores:.2f} cores in use "
          "(process CPU time / wall, untraced)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--what", nargs="+", default=["sampler"],
                    choices=["sampler", "policy", "reward", "step"])
    ap.add_argument("--setting", default="A", choices=["A", "B"],
                    help="issue #10's setting for policy / reward / step")
    ap.add_argument("--calls", type=int, default=3, help="untimed, then traced calls")
    ap.add_argument("--top", type=int, default=8, help="kernel kinds shown per group")
    ap.add_argument("--trace-dir", default="", help="keep the traces here (default: temporary)")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from gfn_jax.baselines import hardware

    print(f"# {hardware()}")
    root = args.trace_dir or tempfile.mkdtemp(prefix="gfn_jax_kernel_profile_")
    n = args.calls
    for what in args.what:
        trace_dir = os.path.join(root, what)
        if what == "sampler":
            from gfn_jax.logprobs import PolicySpec
            from gfn_jax.models import registry
            from gfn_jax.sampling import sample

            m = registry.load("smollm2-135m", dtype="float32")
            cfg, params = m.config, m.params
            P, T, K = 59, 20, 16
            toks = jnp.asarray(np.random.default_rng(0).integers(100, 1000, (1, P)), jnp.int32)
            # min = max length: every row decodes exactly T tokens, the loop runs T times
            spec = PolicySpec(term_ids=(cfg.vocab_size - 1,), max_len=T, min_len=T)

            def call(i: int, cfg=cfg, params=params, toks=toks, spec=spec, K=K):
                return jax.block_until_ready(sample(cfg, params, jax.random.PRNGKey(i), toks,
                                                    jnp.ones_like(toks), spec, num_samples=K))

            untraced, walls, spans, cores = profile(call, n, trace_dir)
            summary(f"sampler, SmolLM2-135M float32, {K} rows x {T} new tokens, prompt {P}",
                    untraced, walls, spans, n, cores)
            runs: Dict[str, int] = collections.Counter(s[0] for s in spans)
            loop = [s for s in spans if runs[s[0]] == n * T]
            once = [s for s in spans if runs[s[0]] == n]
            rest = [s for s in spans if runs[s[0]] not in (n * T, n)]
            print(f"decode loop: {len({s[0] for s in loop})} kernels per step, a kernel "
                  f"running {busy_time(loop) / n / T / 1e3:.1f} ms per step")
            table((("decode loop, per step", loop, n * T), ("once per call", once, n),
                   ("other (prefill layers), per call", rest, n)), args.top)
        else:
            import bench_shared_prompt as bsp  # beside this script, on sys.path when run

            b = bsp.build(argparse.Namespace(preset="smollm2-135m", lora_rank=64),
                          bsp.SETTINGS[args.setting])

            def call(i: int, b=b, what=what):
                return bsp._call(b["fns"]["new"], what, b["tree"], b["params"], b["batch"])

            untraced, walls, spans, cores = profile(call, n, trace_dir)
            summary(f"{what}, setting {args.setting} ({bsp.SETTINGS[args.setting]}), "
                    "SmolLM2-135M shape, float32, LoRA r=64 on q,k,v,o, prompt shared",
                    untraced, walls, spans, n, cores)
            table(((what + ", per call", spans, n),), args.top)
    if not args.trace_dir:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
