"""Tests for benchmarks/bench_step.py (gfn-jax vs PyTorch reference benchmark).

* The tiny preset runs end to end in a subprocess with ``ml_collections``, ``gguf`` and
  ``tensorboardX`` made unimportable (as on the GPU image), writes the JSON with every
  figure, and its float32 correctness check agrees: the two implementations' SubTB loss,
  per-step log-probs, log R and LoRA gradients on the same weights and batch.
* The reference's cumulative-sum SubTB equals a naive double loop over state pairs.
* Bad command-line values fail with a clear message.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_step.py"

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

# Runs the script with the modules the GPU image lacks made unimportable.
_BLOCKED_RUNNER = """
import importlib.abc, runpy, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('ml_collections', 'gguf', 'tensorboardX'):
            raise ImportError('blocked for the test: ' + name)
sys.meta_path.insert(0, _Block())
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_step_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_end_to_end_json_and_loss_agreement(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
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


@pytest.mark.parametrize("lamb,min_len", [(1.0, 0), (0.7, 2), (0.0, 1)])
def test_reference_subtb_equals_naive_pairs(lamb, min_len):
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
