"""The Policy value: loaded from a run directory without optimizer state, its samples and
log-probabilities agree with each other and with exact enumeration; the README's library
example runs as written; the package runs from a non-editable install."""

import dataclasses
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import gfn_jax
from gfn_jax import cli
from gfn_jax.tasks.continuation import resolve_data_path
from gfn_jax.tasks.toy import toy_outcomes
from tiny import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "configs", "toy_exact.py")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("runs") / "toy")
    assert cli.main(["gfn-jax", "train", "--config", TOY, "--workdir", wd, "--noprogress",
                     "--config.train.steps=3", "--config.eval.num_samples=0",
                     "--config.train.ckpt_every=0"]) == 0
    return wd


def test_load_policy_needs_no_optimizer_state(toy_run, monkeypatch):
    import optax

    from gfn_jax import train

    def boom(*a, **k):
        raise AssertionError("loading a policy must not build a trainer or optimizer state")

    monkeypatch.setattr(train.Trainer, "__init__", boom)
    monkeypatch.setattr(optax, "adamw", boom)
    policy = gfn_jax.load_policy(toy_run)
    assert isinstance(policy, gfn_jax.Policy)
    assert policy.adapters is None  # the toy config fine-tunes all parameters


def test_log_prob_is_a_distribution_and_matches_samples(toy_run):
    policy = gfn_jax.load_policy(toy_run)
    outs = toy_outcomes()
    lq = policy.log_prob(["<s>"] * len(outs), outs)
    assert np.exp(lq).sum() == pytest.approx(1.0, abs=1e-4)
    samples = policy.sample(["<s>"], n=200, seed=3)
    assert len(samples) == 200 and {"prompt", "text", "tokens", "log_q"} <= set(samples[0])
    by_text = dict(zip(outs, lq))
    for s in samples[:50]:
        assert s["log_q"] == pytest.approx(by_text[s["text"]], abs=1e-4)
    # sampling frequencies agree with the enumerated probabilities
    counts = {}
    for s in policy.sample(["<s>"], n=4000, seed=4, batch_size=2000):
        counts[s["text"]] = counts.get(s["text"], 0) + 1
    tv = 0.5 * sum(abs(counts.get(z, 0) / 4000 - np.exp(by_text[z])) for z in outs)
    assert tv < 0.06, tv


def test_policy_errors_are_clear(toy_run):
    policy = gfn_jax.load_policy(toy_run)
    with pytest.raises(ValueError, match="more than the policy's max_len=3"):
        policy.log_prob(["<s>"], ["abca"])
    with pytest.raises(ValueError, match=r"prompts but 2 continuations"):
        policy.log_prob(["<s>"], ["a", "b"])
    with pytest.raises(ValueError, match="must be >= 1"):
        policy.sample(["<s>"], n=0)


def test_sampling_loops_lay_the_weights_out_once(toy_run, monkeypatch):
    """Policy.for_decoding: a loop of a few sampler calls of few rows gets the weights laid
    out once (DecodeWeights, CPU); one call, calls of more rows than decode feature-major, or
    a policy that already carries a copy are left as they are; samples drawn with the copy
    have the log q that log_prob gives them."""
    from gfn_jax.models.transformer import FEATURE_MAJOR_MAX_ROWS
    from gfn_jax.policy import MIN_CALLS_TO_KEEP

    monkeypatch.delenv("GFN_JAX_DECODE_FEATURE_MAJOR", raising=False)
    policy = gfn_jax.load_policy(toy_run)
    assert policy.decode_weights is None
    looped = policy.for_decoding(calls=MIN_CALLS_TO_KEEP, rows=8)
    assert isinstance(looped.decode_weights, gfn_jax.DecodeWeights)
    assert looped.decode_weights.made_from(policy.params)
    assert looped.for_decoding(MIN_CALLS_TO_KEEP, 8) is looped
    assert policy.for_decoding(MIN_CALLS_TO_KEEP - 1, 8) is policy
    assert policy.for_decoding(MIN_CALLS_TO_KEEP, FEATURE_MAJOR_MAX_ROWS + 1) is policy
    # decoders that scan the stacked weights copy none: nothing to keep
    scanned = dataclasses.replace(
        policy, model_config=policy.model_config.replace(decode_layers="scanned"))
    assert scanned.for_decoding(MIN_CALLS_TO_KEEP, 8) is scanned
    samples = looped.sample(["<s>"], n=32, batch_size=8, seed=5)
    lq = policy.log_prob(["<s>"] * 32, [r["text"] for r in samples])
    np.testing.assert_allclose([r["log_q"] for r in samples], lq, atol=1e-4)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        policy.sample_total(["<s>"], 4, batch_size=0)


def test_readme_library_example_runs_as_written(toy_run, monkeypatch):
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README has a python example"
    monkeypatch.chdir(os.path.dirname(os.path.dirname(toy_run)))
    os.makedirs("runs", exist_ok=True)
    if not os.path.exists("runs/toy"):
        os.symlink(toy_run, "runs/toy")
    for b in blocks:
        ns = {}
        exec(compile(b, "README.md", "exec"), ns)  # noqa: S102 - our own documentation
    assert ns["logits"].shape[:2] == (2, ns["P"])
    assert len(ns["samples"]) == 5 and ns["log_q"].shape == (2,)


def test_relative_data_paths_resolve_against_the_working_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_data_path("data/x.txt") == str(tmp_path / "data" / "x.txt")
    assert resolve_data_path("x.txt", str(tmp_path / "root")) == str(tmp_path / "root" / "x.txt")
    assert resolve_data_path("/abs/x.txt", "/ignored") == "/abs/x.txt"
    assert "site-packages" not in resolve_data_path("../shared/data/subj/train.jsonl")


@pytest.mark.slow
def test_runs_from_a_non_editable_install(tmp_path):
    """`pip install .` (not -e): the installed package trains and samples from another
    working directory; nothing is read from the source tree but the config file."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(target), ROOT], check=True,
                   capture_output=True, timeout=600)
    env = dict(os.environ, PYTHONPATH=str(target), XLA_FLAGS=xla_flags())
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([sys.executable, "-c", "import gfn_jax; print(gfn_jax.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(target))
    run = subprocess.run(
        [sys.executable, "-m", "gfn_jax.cli", "train", "--config", TOY, "--workdir", "run",
         "--noprogress", "--config.train.steps=2", "--config.eval.num_samples=0"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    out = subprocess.run(
        [sys.executable, "-m", "gfn_jax.cli", "sample", "--workdir", "run", "--num", "10",
         "--output", "s.jsonl"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(open(work / "s.jsonl").read().splitlines()) == 10
