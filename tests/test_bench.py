"""Tests for benchmarks/bench_step.py (gfn-jax vs PyTorch reference benchmark).

* The tiny preset runs end to end in a subprocess with ``ml_collections``, ``gguf`` and
  ``tensorboardX`` made unimportable (as on the GPU image), writes the JSON with every
  figure, and its float32 correctness check agrees: the two implementations' SubTB loss,
  per-step log-probs, log R and LoRA gradients on the same weights and batch.
* The reference's cumulative-sum SubTB equals a naive double loop over state pairs.
* Bad command-line values fail with a clear message.

And for benchmarks/bench_official.py (ours vs the paper's official PyTorch pipeline):

* without torch (made unimportable) and without a snapshot of the official code, the tiny
  preset runs our side alone and says why the official side is skipped;
* the two sides alternate which goes first, step by step;
* our side runs in a child process of its own when asked (the default next to the official
  side);
* with ``$GFN_JAX_OFFICIAL`` pointing at a work tree of GFNOrg/gfn-lm-tuning (and its
  packages installed), the tiny preset runs both sides through the official training loops
  (slow; skipped with the reason otherwise).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from tiny import xla_flags

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_step.py"

OFFICIAL_SCRIPT = ROOT / "benchmarks" / "bench_official.py"

HAVE_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="needs torch and transformers")

# Runs a script (argv[1:]) as if the packages in BLOCKED were not installed: importing one
# fails, and importlib.util.find_spec says None (as availability probes, e.g. accelerate's
# when transformers loads it, expect of a missing package).
_RUNNER = """
import importlib.abc, importlib.util, runpy, sys
BLOCKED = {blocked!r}
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError('blocked for the test: ' + name)
_find_spec = importlib.util.find_spec
def _probe(name, package=None):
    if name.split('.')[0] in BLOCKED:
        return None
    return _find_spec(name, package)
importlib.util.find_spec = _probe
sys.meta_path.insert(0, _Block())
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""
# The modules the GPU image lacks made unimportable.
_BLOCKED_RUNNER = _RUNNER.format(blocked=("ml_collections", "gguf", "tensorboardX"))


def _load_script(path: Path, name: str):
    """A benchmark script imported as a module (its ``main`` not run)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _load_bench():
    return _load_script(SCRIPT, "bench_step_under_test")


@needs_torch
def test_tiny_end_to_end_json_and_loss_agreement(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS=xla_flags())
    cmd = [sys.executable, "-c", _BLOCKED_RUNNER, str(SCRIPT), "--preset", "tiny",
           "--batch", "3", "--prompt-len", "5", "--traj-len", "4", "--steps", "2",
           "--warmup", "1", "--subtb-lambda", "0.9", "--lora-targets", "q,v,down",
           "--no-peft", "--torch-threads", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| train step, median ms |" in proc.stdout
    assert "| sampler tokens/s (B*T) |" in proc.stdout

    res = json.loads(out.read_text())
    cfg = res["config"]
    assert (cfg["preset"], cfg["batch"], cfg["prompt_len"], cfg["traj_len"]) == ("tiny", 3, 5, 4)
    assert cfg["lora_targets"] == ["q", "v", "down"] and cfg["dtype"] == "float32"
    # the package imports without ml_collections / gguf / tensorboardX (as on the GPU image)
    assert res["env"]["gfn_jax_import"] is None
    assert res["env"]["lora_impl"] == "hand-written" and res["env"]["torch_threads"] == 1
    for side in ("ours", "reference"):
        for phase, tokens in (("train", 3 * (5 + 4)), ("sample", 3 * 4)):
            r = res[side][phase]
            assert len(r["times_s"]) == 2 and all(t > 0 for t in r["times_s"])
            assert r["median_s"] == pytest.approx(float(np.median(r["times_s"])))
            assert r["tokens_per_step"] == tokens
            assert r["tokens_per_s"] == pytest.approx(tokens / r["median_s"])
            assert "peak_bytes" in r  # None on CPU: the backend reports no peak
        assert 1.0 <= res[side]["sample"]["mean_length"] <= 4.0
    for key, val in res["ratios"].items():
        phase, metric = key.split("_", 1)
        o, r = res["ours"][phase][metric], res["reference"][phase][metric]
        assert val == (None if o is None or not r else pytest.approx(o / r))

    c = res["check"]
    assert c["rows"] == 3
    assert math.isfinite(c["loss_ours"]) and c["loss_ours"] > 0
    assert c["loss_abs_diff"] == pytest.approx(abs(c["loss_ours"] - c["loss_reference"]))
    assert c["loss_abs_diff"] <= 1e-5 * max(1.0, abs(c["loss_reference"]))
    for k in ("log_pf", "log_pterm", "log_r", "sampler_log_pf", "sampler_log_pterm"):
        assert c[f"{k}_max_abs_diff"] < 1e-4, (k, c)
    assert c["grad_max_abs_reference"] > 0  # the adapters do receive gradient
    assert c["grad_rel_diff"] < 1e-4
    # Same weights, same batch, float32: the first timed step's losses agree too.
    assert res["first_step_loss_abs_diff_timed_dtype"] <= 1e-5 * max(1.0, c["loss_reference"])


def _naive_subtb(log_pf, log_pterm, log_r, lengths, min_len, lamb):
    num = den = 0.0
    for b in range(log_pf.shape[0]):
        n = int(lengths[b])
        log_f = [log_r[b, i] - log_pterm[b, i] for i in range(n + 1)]
        for i in range(min_len, n + 1):
            for j in range(i + 1, n + 1):
                res = log_f[i] + sum(log_pf[b, i:j]) - log_f[j]
                w = lamb ** (j - i - 1)
                num += w * res * res
                den += w
    return num / den


@needs_torch
@pytest.mark.parametrize("lamb,min_len", [(1.0, 0), (0.7, 2), (0.0, 1)])
def test_reference_subtb_equals_naive_pairs(lamb, min_len):
    import torch

    bench = _load_bench()
    rng = np.random.default_rng(3)
    B, T = 4, 6
    log_pf = -rng.uniform(0.1, 3.0, (B, T))
    log_pterm = -rng.uniform(0.1, 5.0, (B, T + 1))
    log_r = rng.normal(-10.0, 3.0, (B, T + 1))
    lengths = np.array([6, 3, 2, 5])
    # Garbage beyond each row's end must not matter.
    for b, n in enumerate(lengths):
        log_pf[b, n:] = 1e4
        log_pterm[b, n + 1:] = -1e4
        log_r[b, n + 1:] = 1e4
    t64 = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    got = bench.torch_subtb_loss(torch, t64(log_pf), t64(log_pterm), t64(log_r),
                                 torch.tensor(lengths), min_len, lamb)
    want = _naive_subtb(log_pf, log_pterm, log_r, lengths, min_len, lamb)
    assert float(got) == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("argv,msg", [
    (["--lora-targets", "q,wrong"], "--lora-targets"),
    (["--warmup", "0"], "--warmup must be >= 1"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--traj-len", "3", "--min-len", "4"], "--min-len"),
])
def test_bad_arguments_fail_clearly(argv, msg, capsys):
    bench = _load_bench()
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert msg in capsys.readouterr().err


# ---------------------------------------------------------------------------
# benchmarks/bench_official.py
# ---------------------------------------------------------------------------
# torch (and what needs it) unimportable.
_NO_TORCH_RUNNER = _RUNNER.format(blocked=("torch", "transformers", "peft",
                                           "pytorch_lightning"))


def _load_official_bench():
    return _load_script(OFFICIAL_SCRIPT, "bench_official_under_test")


def _check_phases(rows, official):
    for ph in ("sampling", "reward", "policy", "sampling+policy", "total"):
        r = rows[ph]
        assert r["ours_s"] > 0 and math.isfinite(r["ours_s"]), (ph, r)
        assert r["floor_gflop"] > 0 and r["floor_s"] > 0, (ph, r)
        if official:
            assert r["official_s"] > 0 and r["speedup"] == pytest.approx(
                r["official_s"] / r["ours_s"]), (ph, r)
        else:
            assert r["official_s"] is None and r["speedup"] is None


def test_official_bench_ours_only_without_torch_or_snapshot(tmp_path):
    """The JAX side alone, tiny preset, one timed step: no torch, no snapshot needed."""
    out = tmp_path / "official.json"
    env = {k: v for k, v in os.environ.items() if k != "GFN_JAX_OFFICIAL"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS=xla_flags())
    cmd = [sys.executable, "-c", _NO_TORCH_RUNNER, str(OFFICIAL_SCRIPT), "--preset", "tiny",
           "--setting", "B", "--steps", "1", "--warmup", "1", "--no-fused",
           "--matmul-size", "256", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "official side skipped: no snapshot of the official code" in proc.stderr
    assert "| train step (sampling + reward + policy + backward + update) |" in proc.stdout
    res = json.loads(out.read_text())
    assert res["official"] is None and "GFN_JAX_OFFICIAL" in res["official_skipped"]
    assert "torch" not in res["env"]
    b = res["settings"]["B"]
    assert b["setting"]["prompt_len"] == 30 and b["setting"]["traj_len"] == 20
    assert len(b["ours_steps"]) == 2 and b["official_steps"] == []
    assert all(s["mean_length"] == 20.0 for s in b["ours_steps"])  # min = max = 20 tokens
    assert all(math.isfinite(x) for x in b["ours_losses"])
    _check_phases(b["phases"], official=False)


def test_official_bench_alternates_sides():
    bench = _load_official_bench()
    order = []
    alt = bench.Alternator(lambda s: order.append(("ours", s)) or {"sampling": 1.0})
    sampler = bench.timed_sampler(lambda x, reward_fn=None: reward_fn(x) + 1, alt)
    for s in range(4):
        alt.begin(s)
        order.append(("official", s))
        assert sampler(1, reward_fn=lambda x: 2 * x) == 3
        alt.end(s)
    assert order == [("official", 0), ("ours", 0), ("ours", 1), ("official", 1),
                     ("official", 2), ("ours", 2), ("ours", 3), ("official", 3)]
    assert len(alt.official) == 4 and all(r["reward_calls"] == 1 for r in alt.official)
    with pytest.raises(RuntimeError, match="without calling its sampler"):
        alt.begin(4)
        alt.end(4)


def test_official_bench_runs_ours_in_a_process_of_its_own():
    """--ours-process separate: our side is built and stepped in a child interpreter (its
    own pid, its own OS counters), answers each step with its phase times and returns its
    losses when closed; a failure in the child is raised here with the child's error."""
    from gfn_jax.models import registry

    bench = _load_official_bench()
    args = bench.parse_args(["--preset", "tiny", "--no-fused", "--malloc", "keep"])
    tok = registry.tiny_model("llama", seed=0, max_seq_len=512).tokenizer
    term = bench.term_ids_of(tok, "next_sentence")
    prompt = bench.make_ids(np.random.default_rng(0), 64, 30, [term, tok.eos_id, tok.pad_id])
    worker = bench.OursWorker(args, "B", prompt, [], term, 2)
    try:
        assert worker.pid != os.getpid() and worker.malloc == "keep"
        alt = bench.Alternator(worker.step, lambda: worker.last_os)
        for s in range(2):
            alt.run_ours(s)
        for row, usage in zip(alt.ours, alt.ours_os):
            assert row["sampling"] > 0 and row["reward"] > 0 and row["policy"] > 0
            assert row["mean_length"] == 20.0 and "fused" not in row
            assert set(usage) == {"user_cpu_s", "system_cpu_s", "minor_faults",
                                  "major_faults", "peak_rss_mb"} and usage["minor_faults"] >= 0
    finally:
        worker.close()
    assert worker.proc.returncode == 0
    assert len(worker.losses) == 2 and all(math.isfinite(x) for x in worker.losses)
    with pytest.raises(RuntimeError, match="our side's process failed: KeyError"):
        bench.OursWorker(args, "no such setting", prompt, [], term, 1)


def test_official_bench_flops_count_one_reward_pass_per_prefix():
    bench = _load_official_bench()
    cfg = types.SimpleNamespace(d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128,
                                vocab_size=257, n_layers=2)
    a = bench.phase_flops(cfg, bench.SETTINGS["A"], 64)
    b = bench.phase_flops(cfg, bench.SETTINGS["B"], 64)
    f = bench.fwd_flops
    assert a["official"]["reward"] == pytest.approx(
        sum(f(cfg, 16, 59 + i + 10, 0, 16 * (59 + i + 10), 0) for i in range(21)))
    assert b["official"]["reward"] == pytest.approx(f(cfg, 16, 50, 0, 16 * 50, 0))
    for d in (a, b):
        for side in ("floor", "official"):
            x = d[side]
            assert x["total"] == pytest.approx(x["sampling"] + x["reward"] + x["policy"])
        assert d["floor"]["total"] < d["official"]["total"]


@pytest.mark.parametrize("argv,msg", [(["--steps", "0"], "--steps must be >= 1"),
                                      (["--setting", "C"], "invalid choice")])
def test_official_bench_bad_arguments(argv, msg, capsys):
    bench = _load_official_bench()
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert msg in capsys.readouterr().err


@pytest.mark.slow
def test_official_bench_both_sides_tiny(tmp_path):
    """Both sides through the official training loops (needs a snapshot of the official
    code in $GFN_JAX_OFFICIAL and its packages; see benchmarks/README.md)."""
    bench = _load_official_bench()
    why = bench.check_official(os.environ.get("GFN_JAX_OFFICIAL", ""))
    if why:
        pytest.skip(f"official side not run: {why}")
    out = tmp_path / "official.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(OFFICIAL_SCRIPT), "--preset", "tiny", "--steps", "1",
           "--warmup", "1", "--matmul-size", "256", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["official"]["path"] and res["env"]["torch_threads"] == 2
    for name, calls in (("A", 21), ("B", 1)):  # A: one reward pass per prefix
        r = res["settings"][name]
        assert len(r["official_steps"]) == 2 and len(r["ours_steps"]) == 2
        assert all(s["reward_calls"] == calls for s in r["official_steps"])
        assert all(math.isfinite(x) for x in r["official_losses"] + r["ours_losses"])
        assert r["official_driver"]["entry"]
        _check_phases(r["phases"], official=True)


def test_cpu_model_names_the_widest_vector_extension(tmp_path):
    from gfn_jax.baselines import cpu_model

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse4_2 avx avx2 "
                    "avx512f avx512bw\n\nprocessor\t: 1\nmodel name\t: other\nflags\t: avx\n")
    assert cpu_model(str(info)) == "AMD EPYC 9R14, avx512f"
    info.write_text("model name\t: Intel Xeon\nflags\t: fpu avx avx2 fma\n")
    assert cpu_model(str(info)) == "Intel Xeon, avx2"
    assert cpu_model(str(tmp_path / "missing"))  # falls back to the platform module


def test_small_m_matmul_runs_and_its_two_step_layouts_agree(tmp_path):
    """benchmarks/small_m_matmul.py at its smallest: every figure printed, and the
    feature-major decode step computes the batch-major step's logits."""
    import re

    cmd = [sys.executable, str(ROOT / "benchmarks" / "small_m_matmul.py"), "--rows", "2",
           "--layers", "1", "--reps", "1"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS=xla_flags())
    proc = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for what in ("x @ W, W [K, N] (ours)", "W @ x.T, W [N, K] (feature-major)",
                 "stream the weights once", "numpy x @ W", "1024^3 float32 matmul"):
        assert what in out, out
    m = re.search(r"feature-major [0-9.]+ ms \(max \|logit difference\| ([0-9.e+-]+)\)", out)
    assert m and float(m.group(1)) < 1e-4, out


def test_reward_breakdown_runs_and_its_parts_make_the_scorer(tmp_path):
    """benchmarks/reward_breakdown.py on a tiny random model: every figure printed, and the
    transformer pass + vocabulary part it times compute the infilling scorer's rewards."""
    import re

    cmd = [sys.executable, str(ROOT / "benchmarks" / "reward_breakdown.py"), "--model",
           "tiny-llama", "--rows", "2", "--prompt", "4", "--new", "3", "--suffix", "3",
           "--reps", "1"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS=xla_flags())
    proc = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for what in ("whole scorer:", "transformer pass", "vocabulary part", "1024^3 matmul",
                 "@ ["):
        assert what in out, out
    m = re.search(r"max \|parts - whole scorer\| over the 2 x 4 prefix rewards: ([0-9.e+-]+)",
                  out)
    assert m and float(m.group(1)) < 1e-4, out


def test_multihost_fetch_runs_on_two_processes():
    """benchmarks/multihost_fetch.py at its smallest: both processes report both ways (each
    worker also checks the fetched values)."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "multihost_fetch.py"), "--reps", "1",
           "--metrics", "3", "--devices", "2"]
    proc = subprocess.run(cmd, cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "| fetch | way | process 0 ms | process 1 ms |" in out, out
    for way in ("process_allgather", "to_host"):
        for what in ("metrics", "metrics + per-row array"):
            assert f"| {what} | {way} | " in out, out


def _write_trace(path, events):
    import gzip

    path.mkdir(parents=True)
    with gzip.open(path / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_profiling_reads_cpu_kernels_and_their_busy_time(tmp_path):
    """gfn_jax.profiling on an XLA:CPU-style trace: runtime and Python spans are not kernels;
    busy time is the union of the kernels' intervals (overlaps on two threads count once)."""
    from gfn_jax import profiling

    _write_trace(tmp_path / "cpu" / "plugins", [
        {"ph": "X", "name": "ThunkExecutor::Execute", "ts": 0, "dur": 100, "tid": 1},
        {"ph": "X", "name": "$api.py:1 block_until_ready", "ts": 0, "dur": 100, "tid": 9},
        {"ph": "X", "name": "np.asarray(jax.Array)", "ts": 0, "dur": 90, "tid": 9},
        {"ph": "X", "name": "ynn_fusion.3", "ts": 10, "dur": 20, "tid": 1},
        {"ph": "X", "name": "ynn_fusion.3", "ts": 15, "dur": 20, "tid": 2},  # overlaps
        {"ph": "X", "name": "copy_fusion", "ts": 50, "dur": 5, "tid": 1},
        {"ph": "i", "name": "marker", "ts": 60, "tid": 1},
    ])
    spans = profiling.kernel_spans(str(tmp_path / "cpu"))
    assert sorted(s.name for s in spans) == ["copy_fusion", "ynn_fusion.3", "ynn_fusion.3"]
    assert profiling.busy_time(spans) == pytest.approx(25 + 5)  # [10, 35) and [50, 55)
    assert profiling.kernel_kind("ynn_fusion.3") == "ynn_fusion"
    assert profiling.kernel_kind("input_reduce_fusion_12") == "input_reduce_fusion"
    assert profiling.kernel_kind("copy_fusion") == "copy_fusion"
    s = profiling.summarize(spans, wall_s=100e-6)
    assert s["busy_fraction"] == pytest.approx(0.30) and s["kernels"] == 3
    assert s["top"][0] == {"kind": "ynn_fusion", "count": 2, "ms": pytest.approx(0.040)}
    assert "30%" in profiling.describe(s)


def test_profiling_reads_only_a_devices_stream_lines(tmp_path):
    """On an accelerator's trace the kernels are the spans of the device process's stream
    lines; host spans and the device's derived lines (modules, ops) are not counted."""
    from gfn_jax import profiling

    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 7, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 7, "tid": 1, "name": "thread_name",
         "args": {"name": "Stream #13(Compute)"}},
        {"ph": "M", "pid": 7, "tid": 2, "name": "thread_name",
         "args": {"name": "Stream #14(MemcpyD2H)"}},
        {"ph": "M", "pid": 7, "tid": 3, "name": "thread_name", "args": {"name": "XLA Ops"}},
        {"ph": "M", "pid": 7, "tid": 4, "name": "thread_name", "args": {"name": "XLA Modules"}},
    ]
    _write_trace(tmp_path / "gpu" / "plugins", meta + [
        {"ph": "X", "pid": 1, "tid": 5, "name": "ynn_fusion.1", "ts": 0, "dur": 500},  # host
        {"ph": "X", "pid": 7, "tid": 4, "name": "jit_step", "ts": 0, "dur": 400},
        {"ph": "X", "pid": 7, "tid": 3, "name": "fusion.2", "ts": 10, "dur": 30},
        {"ph": "X", "pid": 7, "tid": 1, "name": "gemm_fusion_dot.4", "ts": 10, "dur": 30},
        {"ph": "X", "pid": 7, "tid": 1, "name": "loop_fusion_7", "ts": 100, "dur": 10},
        {"ph": "X", "pid": 7, "tid": 2, "name": "MemcpyD2H", "ts": 105, "dur": 10},
    ])
    spans = profiling.kernel_spans(str(tmp_path / "gpu"))
    assert sorted(s.name for s in spans) == ["MemcpyD2H", "gemm_fusion_dot.4", "loop_fusion_7"]
    assert {s.track for s in spans} == {"Stream #13(Compute)", "Stream #14(MemcpyD2H)"}
    assert profiling.busy_time(spans) == pytest.approx(30 + 15)  # [10, 40) and [100, 115)
    # a device with no stream lines: its "XLA Ops" line (not the module line beside it); a
    # device with neither: every line it has; the host's spans never count
    _write_trace(tmp_path / "tpu" / "plugins", [
        {"ph": "M", "pid": 3, "name": "process_name", "args": {"name": "/device:TPU:0"}},
        {"ph": "M", "pid": 3, "tid": 1, "name": "thread_name", "args": {"name": "XLA Ops"}},
        {"ph": "M", "pid": 3, "tid": 2, "name": "thread_name", "args": {"name": "XLA Modules"}},
        {"ph": "M", "pid": 4, "name": "process_name", "args": {"name": "/device:TPU:1"}},
        {"ph": "X", "pid": 3, "tid": 1, "name": "fusion.1", "ts": 0, "dur": 8},
        {"ph": "X", "pid": 3, "tid": 2, "name": "jit_step", "ts": 0, "dur": 50},
        {"ph": "X", "pid": 4, "tid": 7, "name": "fusion.2", "ts": 0, "dur": 8},
        {"ph": "X", "pid": 9, "tid": 1, "name": "host_op", "ts": 0, "dur": 80},
    ])
    assert sorted(s.name for s in profiling.kernel_spans(str(tmp_path / "tpu"))) == [
        "fusion.1", "fusion.2"]
    with pytest.raises(FileNotFoundError, match="create_perfetto_trace"):
        profiling.kernel_spans(str(tmp_path / "nothing"))


def test_step_profiler_traces_its_range_and_never_stops_a_run(tmp_path, caplog):
    """StepProfiler: steps [2, 4) of a loop are traced and summarised per step; when the
    trace cannot start (another one is already running), it warns and the loop goes on."""
    import jax
    import jax.numpy as jnp

    from gfn_jax.profiling import StepProfiler

    f = jax.jit(lambda a: jnp.tanh(a @ a))
    x = jnp.ones((32, 32), jnp.float32)
    prof = StepProfiler(str(tmp_path / "run"), start=2, count=2)
    done = []
    for step in range(6):
        prof.before(step)
        jax.block_until_ready(f(x + step))
        r = prof.after(step)
        if r is not None:
            done.append(r)
    assert prof.close() is None and len(done) == 1
    r = done[0]
    assert (r["first_step"], r["last_step"], r["steps"]) == (2, 3, 2)
    assert r["kernels"] > 0 and 0 < r["busy_fraction"] <= 1
    assert (tmp_path / "run" / "profile" / "process_0" / "summary.json").exists()

    jax.profiler.start_trace(str(tmp_path / "outer"))  # the caller's own trace
    try:
        busy = StepProfiler(str(tmp_path / "run2"), start=0, count=1)
        with caplog.at_level("WARNING", logger="gfn_jax.profiling"):
            busy.before(0)
        assert busy.after(0) is None and busy.close() is None
        assert "the trace did not start" in caplog.text
    finally:
        jax.profiler.stop_trace()


def test_kernel_profile_traces_a_real_jitted_function(tmp_path):
    """benchmarks/kernel_profile.py's profile(): a real trace of a jitted function on this
    JAX yields its kernels, and their busy time lies within the traced wall time."""
    import jax
    import jax.numpy as jnp

    from gfn_jax import profiling

    kp = _load_script(ROOT / "benchmarks" / "kernel_profile.py", "kernel_profile")
    f = jax.jit(lambda a: jnp.tanh(a @ a) + 1.0)
    x = jnp.ones((64, 64), jnp.float32)
    untraced, walls, spans, cores = kp.profile(lambda i: jax.block_until_ready(f(x + i)), 2,
                                               str(tmp_path / "real"))
    assert len(untraced) == len(walls) == 2 and cores > 0
    assert spans, "no kernel spans in this JAX's trace"
    assert not any(s.name.startswith(profiling._NOT_KERNELS) for s in spans)
    assert 0 < kp.busy_time(spans) <= sum(walls) * 1e6
