"""Tests for ``gfn-jax bench`` (gfn_jax/bench.py).

* The command runs end to end on the tiny toy config (configs/toy_exact.py, 8 samples)
  through the CLI entry point in-process: exit code 0, the Markdown table, and a JSON with
  every phase, positive times and FLOPs, MFU in (0, 1) against an explicit peak, the train
  step's FLOPs above the sampler's; with --trace-dir, each phase's kernels from its trace.
* A bad config key fails with a non-zero exit and a message naming the key.
* The FLOP estimate helper against a hand-computed closed form; the device-peak table and
  its detection; XLA's cost analysis and the loop check that decides when it is used.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gfn_jax import bench, cli
from gfn_jax.models import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "configs" / "toy_exact.py")
PHASES = ("sampling", "reward", "train step", "policy+update")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    trace_dir = out.parent / "traces"
    import contextlib
    import io

    buf_out, buf_err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
        rc = cli.main(["gfn-jax", "bench", "--config", TOY,
                       "--config.train.samples_per_prompt=8", "--steps", "2", "--warmup", "1",
                       "--device-peak", "1e12", "--device-bandwidth", "1e11",
                       "--json", str(out), "--trace-dir", str(trace_dir)])
    return rc, buf_out.getvalue(), buf_err.getvalue(), out


def test_tiny_config_end_to_end(tiny_run):
    rc, stdout, stderr, out = tiny_run
    assert rc == 0, stderr
    assert "| phase | ms | tokens/s | GFLOP | GFLOP/s | MFU |" in stdout
    assert "jax " + jax.__version__ in stdout
    for name in ("sampling", "reward", "train step"):
        assert f"] {name}: median" in stderr  # one progress line per phase
    r = json.loads(out.read_text())
    assert r["config"].endswith("toy_exact.py (train.samples_per_prompt=8)")
    assert r["peak"]["flops_per_s"] == 1e12
    assert r["batch"]["rows"] == 8 and r["batch"]["max_len"] == 3
    assert set(PHASES) <= set(r["phases"])
    for name in PHASES:
        p = r["phases"][name]
        assert p["median_s"] > 0 and p["tokens"] > 0 and p["tokens_per_s"] > 0, name
        assert all(t > 0 for t in p["times_s"]), name
        assert p["flops"] > 0 and p["flop_source"], name
        assert 0 < p["mfu"] < 1, name
    for name in ("sampling", "reward", "train step"):
        assert r["phases"][name]["first_call_s"] > 0
    # the step runs the policy forward and backward over every sampled token (and the
    # prompt), the sampler only forward: the step must cost more
    assert r["phases"]["train step"]["flops"] > r["phases"]["sampling"]["flops"]
    # the layer scan is a while loop: the step's figure is the analytic estimate, with
    # XLA's (loop body counted once) kept for reference
    assert r["phases"]["train step"]["flop_source"].startswith("analytic")
    assert r["phases"]["train step"]["xla_flops"] > 0
    assert r["memory"]["bytes"] > 0 and r["memory"]["source"]
    # decode roofline: the weights the sampler reads (toy: full fine-tuning, float32; the
    # untied input embedding is only gathered) and the KV cache, at the given bandwidth
    from gfn_jax.models import param_shapes
    from gfn_jax.policy import load_base_model
    from gfn_jax.tasks import make_task
    import runpy

    c = runpy.run_path(TOY)["get_config"]()
    cfg, _, _ = load_base_model(c, make_task(c.task))
    shapes = param_shapes(cfg)
    weights = sum(np.prod(x.shape) * 4 for x in jax.tree_util.tree_leaves(shapes))
    if not cfg.tie_embeddings:
        weights -= np.prod(shapes["embed"]["embedding"].shape) * 4
    d = r["decode"]
    assert d["weight_bytes_per_device"] == weights
    steps, P = d["steps"], r["batch"]["prompt_len"]
    kv = cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * 4 * (1 * P + 8 * (steps + 1) / 2)
    assert d["kv_bytes_per_step"] == pytest.approx(kv)
    n_dev = r["device"]["count"]  # weights replicated (data parallel), KV split over rows
    floor_s = (weights + kv / n_dev) / 1e11
    assert d["floor_ms"] == pytest.approx(floor_s * 1e3)
    step_s = r["phases"]["sampling"]["median_s"] / steps
    assert d["roofline_fraction"] == pytest.approx(floor_s / step_s)
    assert d["bandwidth"]["bytes_per_s"] == 1e11
    assert "decode: " in stdout and "% of the roofline" in stdout
    # --trace-dir: each measured phase called once more under the profiler, its kernels read
    # back from the trace (the derived policy+update phase has no call of its own)
    assert "kernels (one more call of each phase under jax.profiler.trace" in stdout
    for name in ("sampling", "reward", "train step"):
        prof = r["phases"][name]["profile"]
        assert prof["kernels"] > 0 and 0 < prof["busy_fraction"] <= 1, name
        assert 0 < prof["busy_ms"] <= prof["wall_ms"] * 1.001 and prof["top"], name
        assert list(Path(prof["trace_dir"]).rglob("*.trace.json.gz")), name
        assert f"- {name}: " in stdout
    assert r["phases"]["policy+update"]["profile"] is None


def test_bad_config_key_is_a_short_error(capsys):
    rc = cli.main(["gfn-jax", "bench", "--config", TOY, "--config.nope=1"])
    err = capsys.readouterr().err
    assert rc != 0
    assert "nope" in err and "Traceback" not in err


def test_device_bandwidths():
    gpu = lambda kind: types.SimpleNamespace(platform="gpu", device_kind=kind)  # noqa: E731
    assert bench.resolve_bandwidth(None, gpu("NVIDIA H200")).flops_per_s == 4.8e12
    assert bench.resolve_bandwidth(None, gpu("NVIDIA H100 80GB HBM3")).flops_per_s == 3.35e12
    assert bench.resolve_bandwidth("v5e", None).flops_per_s == 0.819e12
    assert bench.resolve_bandwidth("2e9", None).flops_per_s == 2e9
    assert bench.resolve_bandwidth(None, gpu("NVIDIA H100 PCIe")).flops_per_s is None
    cpu = types.SimpleNamespace(platform="cpu", device_kind="cpu")
    assert bench.resolve_bandwidth(None, cpu, measure=lambda: 5e9).flops_per_s == 5e9
    with pytest.raises(ValueError, match="unknown --device-bandwidth 'B300'"):
        bench.resolve_bandwidth("B300", None)
    # the floor's bytes in closed form: 2 layers x 2 (K, V) x 1 kv head x 4 dims x 2 bytes per
    # position; 3 prompts of 5 shared, 6 rows of 1..4 own tokens (mean 2.5) over 4 steps
    cfg = types.SimpleNamespace(n_layers=2, n_kv_heads=1, head_dim=4)
    fb = bench.decode_floor_bytes(cfg, 1000.0, 3, 5, 6, 4, 2)
    assert fb == {"weights": 1000.0, "kv": 32.0 * (15 + 6 * 2.5), "total": 1000.0 + 32 * 30}
    # measured on this CPU: a positive, finite figure
    assert 0 < bench.measure_cpu_bandwidth(mbytes=16, reps=1) < 1e13


def test_bad_device_peak_is_a_usage_error(capsys):
    rc = cli.main(["gfn-jax", "bench", "--config", TOY, "--device-peak", "B300"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_USAGE and "B300" in err


def test_forward_flops_closed_form():
    cfg = ModelConfig(family="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                      n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=16)
    # per layer: q 32*32 + k, v 2*32*(2*8) + o 32*32 = 3072; SwiGLU MLP 3*32*64 = 6144
    assert bench.matmul_params(cfg) == 2 * (3072 + 6144)
    shape = bench.FlopShape(tokens=10, pairs=50, logits=4)
    linear = 2 * 18432 * 10  # 2 N tokens
    attention = 4 * 2 * 4 * 8 * 50  # 4 L H Dh per (query, key) pair
    head = 2 * 32 * 64 * 4  # 2 D V per logit
    assert bench.forward_flops(cfg, shape) == linear + attention + head == 397824
    assert bench.train_flops(cfg, shape) == 3 * 397824
    # LoRA: no gradient for the frozen base (2x its forward), 3x the adapters' 2·n·tokens
    assert bench.train_flops(cfg, shape, 100, frozen_base=True) == \
        2 * 397824 + 3 * 2 * 100 * shape.tokens
    assert bench.forward_flops(cfg, shape, lora_params=100) == 397824 + 2 * 100 * 10
    gpt2 = ModelConfig(family="gpt2", vocab_size=64, d_model=32, n_layers=1, n_heads=4,
                       d_ff=64, max_seq_len=16)
    assert bench.matmul_params(gpt2) == 4 * 32 * 32 + 2 * 32 * 64
    # shapes: 4 rows, prompt 5, 3 tokens; shared prompt (2 groups) or row by row
    assert bench.scoring_shape(4, 5, 3, 0) == bench.FlopShape(32, 4 * 64, 16)
    assert bench.scoring_shape(4, 5, 3, 2) == bench.FlopShape(2 * 5 + 12, 2 * 25 + 12 * 8, 16)
    assert bench.sampling_shape(2, 5, 3, 8, 3) == bench.FlopShape(10 + 24, 80 + 24 * 8, 2 + 24)


def test_device_peaks():
    gpu = lambda kind: types.SimpleNamespace(platform="gpu", device_kind=kind)  # noqa: E731
    tpu = lambda kind: types.SimpleNamespace(platform="tpu", device_kind=kind)  # noqa: E731
    assert bench.resolve_peak(None, gpu("NVIDIA H100 80GB HBM3"), "bfloat16").flops_per_s \
        == 989.4e12
    assert bench.resolve_peak(None, gpu("NVIDIA H200"), "bfloat16").name == "H200"
    a100 = gpu("NVIDIA A100-SXM4-80GB")
    with jax.default_matmul_precision("tensorfloat32"):
        assert bench.resolve_peak(None, a100, "float32").flops_per_s == 156e12  # TF32
    with jax.default_matmul_precision("highest"):
        assert bench.resolve_peak(None, a100, "float32").flops_per_s == 19.5e12  # full fp32
    assert bench.resolve_peak(None, gpu("NVIDIA H100 PCIe"), "bfloat16").flops_per_s is None
    assert bench.resolve_peak(None, tpu("TPU v4"), "bfloat16").flops_per_s == 275e12
    assert bench.resolve_peak(None, tpu("TPU v5 lite"), "bfloat16").name == "TPU v5e"
    assert bench.resolve_peak(None, tpu("TPU v5p"), "bfloat16").name == "TPU v5p"
    assert bench.resolve_peak(None, tpu("TPU v6 lite"), "float32").flops_per_s == 918e12
    assert bench.resolve_peak("v5e", None, "bfloat16").flops_per_s == 197e12
    assert bench.resolve_peak("h100 sxm", None, "bfloat16").name == "H100 SXM"
    assert bench.resolve_peak("2.5e11", None, "float32").flops_per_s == 2.5e11
    cpu = types.SimpleNamespace(platform="cpu", device_kind="cpu")
    assert bench.resolve_peak(None, cpu, "float32", measure=lambda: 7e10).flops_per_s == 7e10
    with pytest.raises(ValueError, match="B300"):
        bench.resolve_peak("B300", None, "bfloat16")
    with pytest.raises(ValueError):
        bench.resolve_peak("-1", None, "bfloat16")


def test_xla_flops_and_loop_check():
    x = jnp.ones((8, 16), jnp.float32)
    w = jnp.ones((3, 16, 16), jnp.float32)
    plain = jax.jit(lambda x, w: x @ w[0]).lower(x, w).compile()
    flops, loop = bench.xla_flops(plain)
    assert flops == 2 * 8 * 16 * 16 and not loop
    scan = jax.jit(lambda x, w: jax.lax.scan(lambda h, wi: (h @ wi, None), x, w)[0])
    flops, loop = bench.xla_flops(scan.lower(x, w).compile())
    assert loop  # XLA counts the body once (here: 1 of 3 matmuls), so it is not used
