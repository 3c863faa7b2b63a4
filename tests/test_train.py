"""The trainer: sharded step equals single device, resume determinism, NaN handling, tasks'
rewards against closed forms, and the CLI."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gfn_jax import cli
from gfn_jax.checkpoint import Checkpointer
from gfn_jax.defaults import validate_config
from gfn_jax.metrics import read_metrics
from gfn_jax.models.registry import char_tokenizer
from gfn_jax.models.config import ModelConfig
from gfn_jax.sampling import DecodeWeights
from gfn_jax.tasks.rng import RandomNumberTask, parse_valid_integer
from gfn_jax.tasks.toy import ToyTask, toy_log_reward_text
from gfn_jax.train import NonFiniteLossError, Trainer, state_mask_from
from tiny import xla_flags, toy_config as tiny_toy_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toy_config(**overrides):
    return tiny_toy_config(**{"train.log_every": 1, **overrides})


# ---------------------------------------------------------------------------
# Task rewards against closed forms
# ---------------------------------------------------------------------------
def test_toy_reward_every_prefix_matches_closed_form():
    c = toy_config()
    task = ToyTask(c.task)
    tok = task.build_tokenizer()
    task.setup(ModelConfig(family="llama", vocab_size=tok.vocab_size, d_model=8, n_layers=1,
                           n_heads=2, d_ff=8, max_seq_len=8), tok)
    strings = ["".join(p) for p in itertools.product("abc", repeat=3)]
    z = np.array([[tok.token_to_id(ch) for ch in s] for s in strings], np.int32)
    got = np.asarray(task.log_reward(None, None, {"tokens": jnp.asarray(z)}))
    for r, s in enumerate(strings):
        for i in range(4):
            assert got[r, i] == pytest.approx(toy_log_reward_text(s[:i]), abs=1e-6), (s, i)


def test_rng_reward_matches_parser():
    tok = char_tokenizer("0123456789x \n", specials=("<eos>",))
    task = RandomNumberTask({"max_len": 3})
    task.setup(ModelConfig(family="llama", vocab_size=tok.vocab_size, d_model=8, n_layers=1,
                           n_heads=2, d_ff=8, max_seq_len=8), tok)
    rng = np.random.default_rng(0)
    alphabet = "0123456789x "
    strings = ["".join(rng.choice(list(alphabet), size=3)) for _ in range(300)]
    strings += ["100", "099", "7xx", "42 ", "000"]
    z = np.array([tok.encode(s) for s in strings], np.int32)
    got = np.asarray(task.log_reward(None, None, {"tokens": jnp.asarray(z)}))
    for r, s in enumerate(strings):
        for i in range(4):
            want = 0.0 if parse_valid_integer(s[:i]) is not None else task.invalid_log_reward
            assert got[r, i] == want, (s, i)


def test_state_mask_excludes_tool_splices_and_short_prefixes():
    am = jnp.array([[True, False, True, True], [True, True, False, False]])
    lengths = jnp.array([4, 2])
    m = np.asarray(state_mask_from(lengths, am, min_len=1))
    # row 0: prefix 1 is followed by a spliced token -> not a state; prefix 0 < min_len
    assert m[0].tolist() == [False, False, True, True, True]
    assert m[1].tolist() == [False, True, True, False, False]


# ---------------------------------------------------------------------------
# The sharded step equals the single-device step
# ---------------------------------------------------------------------------
def _one_step(config, devices, workdir, batch=None):
    """One rollout's update from ``batch`` (default: the trainer's own step-0 batch);
    returns (loss, trainable, log_z, the batch)."""
    tr = Trainer(config, workdir, restore=False, devices=devices)
    if batch is None:
        batch, _ = tr.make_batch(0)
    metrics, _ = tr.train_step(batch, 1.0)
    return (float(metrics["loss"]), jax.device_get(tr.state.trainable),
            jax.device_get(tr.state.log_z), batch)


# each mesh once (every mesh with both objectives took twice as long, ~2 min a case here):
# full fine-tuning on the mesh of all three axes and on FSDP alone, LoRA on pure data
# parallelism and on the tensor axis
@pytest.mark.parametrize("objective,lora,meshes", [
    ("subtb", False, [(2, 2, 2), (1, 8, 1)]),
    ("tb", True, [(8, 1, 1), (2, 1, 4)]),
], ids=["subtb-full", "tb-lora"])
def test_sharded_step_matches_single_device(tmp_path, objective, lora, meshes):
    base = dict(**{"objective.name": objective, "lora.enabled": lora,
                   "objective.log_z": "conditional", "model.init_std": 0.1})
    ref_cfg = toy_config(**base, **{"mesh.data": 1})
    loss0, params0, logz0, batch0 = _one_step(ref_cfg, jax.devices()[:1], str(tmp_path / "ref"))
    assert np.isfinite(loss0)
    # the same host batch into every mesh (the sharded sampler is compared with one device
    # in test_objective_registry.py); the first mesh also samples its own, which must agree
    for k, (data, fsdp, tensor) in enumerate(meshes):
        cfg = toy_config(**base, **{"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor})
        loss, params, logz, _ = _one_step(cfg, None, str(tmp_path / f"m{data}{fsdp}{tensor}"),
                                          None if k == 0 else batch0)
        assert loss == pytest.approx(loss0, abs=1e-5, rel=1e-5), (data, fsdp, tensor)
        for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params0)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(logz), jax.tree_util.tree_leaves(logz0)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_params_are_sharded_by_the_rules(tmp_path, monkeypatch):
    import gfn_jax.policy as policy_mod

    drawn = []
    real_init = policy_mod.init_params
    monkeypatch.setattr(policy_mod, "init_params",
                        lambda *a, **k: drawn.append(k.get("out_shardings")) or real_init(*a, **k))
    cfg = toy_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    tr = Trainer(cfg, str(tmp_path), restore=False)
    # the random model was drawn in its shardings, not on one device and then split
    assert len(drawn) == 1 and drawn[0] is not None
    q_sh = drawn[0]["layers"]["attn"]["q"]["kernel"]
    assert q_sh.mesh.devices.size == 8 and tuple(q_sh.spec)[:3] == (None, "fsdp", "tensor")
    q = tr.state.trainable["layers"]["attn"]["q"]["kernel"]  # [L, D, H, Dh]
    spec = q.sharding.spec
    assert tuple(spec)[:3] == (None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (2, 32, 2, 16)
    # the random model was drawn shard by shard (init_params with out_shardings): the same
    # values as one device's unsharded draw
    from gfn_jax.models import init_params

    ref = init_params(tr.model_cfg, jax.random.PRNGKey(cfg.model.init_seed),
                      std=cfg.model.init_std)
    for a, b in zip(jax.tree_util.tree_leaves(tr.state.trainable), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the trainer's draws sample under its mesh and rules: each row on one device of the
    # batch axes (tests/test_sampling.py checks the split program and its samples)
    from gfn_jax.models.transformer import current_activation_sharding

    seen = []
    real_sample = policy_mod.sample_fn
    monkeypatch.setattr(policy_mod, "sample_fn", lambda *a, **k: seen.append(
        current_activation_sharding()) or real_sample(*a, **k))
    tr.make_batch(0)
    assert seen and all(s == (tr.mesh, tr.rules) for s in seen)


def test_trainer_lays_out_the_lora_base_once_for_the_sampler(tmp_path, monkeypatch):
    """With LoRA on CPU every Policy the trainer hands out carries one DecodeWeights of the
    frozen base, made at first use and kept; none with model.cache_decode_weights off, for
    full fine-tuning (the weights change every step), or when each step's draw has more rows
    than decode feature-major (the copy would never be used)."""
    monkeypatch.delenv("GFN_JAX_DECODE_FEATURE_MAJOR", raising=False)
    tr = Trainer(toy_config(**{"lora.enabled": True}), str(tmp_path / "lora"), restore=False)
    first, second = tr.policy, tr.policy
    assert isinstance(first.decode_weights, DecodeWeights)
    assert second.decode_weights is first.decode_weights
    assert first.decode_weights.made_from(tr.frozen["base"])
    off = Trainer(toy_config(**{"lora.enabled": True, "model.cache_decode_weights": False}),
                  str(tmp_path / "off"), restore=False)
    assert off.policy.decode_weights is None
    full = Trainer(toy_config(**{"lora.enabled": False}), str(tmp_path / "full"), restore=False)
    assert full.policy.decode_weights is None
    wide = Trainer(toy_config(**{"lora.enabled": True, "train.samples_per_prompt": 65}),
                   str(tmp_path / "wide"), restore=False)
    assert wide.policy.decode_weights is None
    assert wide.policy.decode_weights is None  # asked again: still none, nothing was made
    # model.decode_layers reaches the model config; scanned decoders copy no weight, so
    # nothing is kept, and a training step samples and trains with them
    scanned = Trainer(toy_config(**{"lora.enabled": True, "model.decode_layers": "scanned"}),
                      str(tmp_path / "scanned"), restore=False)
    assert scanned.model_cfg.decode_layers == "scanned"
    assert scanned.policy.decode_weights is None
    batch, kind = scanned.make_batch(0)
    assert kind == "on_policy" and batch.tokens.shape[0] == 64
    metrics, _ = scanned.train_step(batch)
    assert np.isfinite(float(metrics["loss"]))


def test_mesh_devices_picks_the_first_devices_and_names_the_key():
    from gfn_jax.defaults import mesh_devices

    assert len(jax.devices()) == 8
    assert mesh_devices(toy_config()) is None  # 0: every device
    assert mesh_devices(toy_config(**{"mesh.devices": 3})) == jax.local_devices()[:3]
    assert mesh_devices(toy_config(**{"mesh.devices": 3}), jax.devices()[5:]) == \
        jax.devices()[5:]  # explicit devices win
    with pytest.raises(ValueError, match=r"mesh.devices=9 but this host has 8 device"):
        mesh_devices(toy_config(**{"mesh.devices": 9}))
    with pytest.raises(ValueError, match=r"mesh.devices must be an int >= 0"):
        validate_config(toy_config(**{"mesh.devices": -1}))


def test_one_device_run_from_the_command_line(tmp_path):
    wd = str(tmp_path / "one")
    assert cli.main(["gfn-jax", "train", "--config", os.path.join(ROOT, "configs/toy_exact.py"),
                     "--workdir", wd, "--noprogress", "--config.train.steps=1",
                     "--config.eval.num_samples=0", "--config.mesh.devices=1"]) == 0
    tr = Trainer(toy_config(**{"mesh.devices": 2, "train.steps": 1}), wd)
    assert tr.mesh.devices.size == 2 and tr.start_step == 1  # resumes onto a different mesh
    q = tr.state.trainable["layers"]["attn"]["q"]["kernel"]
    assert {d for d in q.sharding.device_set} == set(jax.devices()[:2])


# ---------------------------------------------------------------------------
# Resume, NaN, checkpoints
# ---------------------------------------------------------------------------
def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def test_resume_reproduces_uninterrupted_losses(tmp_path, capsys):
    """A run stopped at step 3 and resumed logs the losses of an uninterrupted one. Run b
    also profiles steps 2-4 (train.profile_steps), across the stop: the trace ends at the
    stop, the resumed run traces the rest, the kernels are summarised (run summary,
    profile/process_0/summary.json, stdout), and the losses are unchanged by it."""
    import glob

    over = {"train.steps": 8, "train.ckpt_every": 2, "explore.p_replay": 0.3,
            "explore.p_tempered": 0.2, "explore.p_on_policy": 0.5, "replay.min_size": 1}
    a = str(tmp_path / "a")
    assert "profile" not in Trainer(toy_config(**over), a).run(progress=False)  # off: default
    b = str(tmp_path / "b")
    prof = {**over, "train.profile_start": 2, "train.profile_steps": 3}
    p = Trainer(toy_config(**prof), b).run(progress=False, until=3)["profile"]
    assert (p["first_step"], p["last_step"], p["steps"]) == (2, 2, 1)
    assert Checkpointer(os.path.join(b, "checkpoints")).latest_step() == 3
    tr = Trainer(toy_config(**prof), b)
    assert tr.start_step == 3 and len(tr.replay) > 0
    p = tr.run(progress=False)["profile"]
    assert (p["first_step"], p["last_step"], p["steps"]) == (3, 4, 2)
    assert p["kernels"] > 0 and 0 < p["busy_fraction"] <= 1 and p["top"]
    with open(os.path.join(b, "profile", "process_0", "summary.json")) as f:
        assert json.load(f)["kernels"] == p["kernels"]
    assert glob.glob(os.path.join(b, "profile", "process_0", "**", "*.trace.json.gz"),
                     recursive=True)
    out = capsys.readouterr().out
    assert "profile of steps 2-2, per step: " in out and "profile of steps 3-4, per step: " in out
    la, lb = _losses(a), _losses(b)
    assert sorted(la) == sorted(lb) == list(range(8))
    for s in range(8):
        assert lb[s] == pytest.approx(la[s], rel=1e-6, abs=1e-7), s
    with pytest.raises(ValueError, match="train.profile_steps"):
        validate_config(toy_config(**{"train.profile_steps": -1}))


def test_nan_loss_stops_with_step_and_keeps_clean_checkpoint(tmp_path):
    wd = str(tmp_path)
    tr = Trainer(toy_config(**{"train.steps": 10, "train.ckpt_every": 2}), wd)
    tr.run(progress=False, until=4)
    good = jax.device_get(tr.state.trainable)
    tr2 = Trainer(toy_config(**{"train.steps": 10, "train.ckpt_every": 2}), wd)
    tr2.task.log_reward = lambda c, p, b: jnp.full((b["tokens"].shape[0],
                                                     b["tokens"].shape[1] + 1), jnp.nan)
    with pytest.raises(NonFiniteLossError, match="step 4"):
        tr2.run(progress=False)
    # the state was not touched and the last checkpoint is the clean one
    for a, b in zip(jax.tree_util.tree_leaves(tr2.state.trainable), jax.tree_util.tree_leaves(good)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ck = Checkpointer(os.path.join(wd, "checkpoints"))
    assert ck.latest_step() == 4
    state, meta, _ = ck.restore()
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state))


def test_nan_skip_mode_continues(tmp_path):
    tr = Trainer(toy_config(**{"train.steps": 3, "train.on_nan": "skip"}), str(tmp_path))
    tr.task.log_reward = lambda c, p, b: jnp.full((b["tokens"].shape[0],
                                                    b["tokens"].shape[1] + 1), jnp.nan)
    before = jax.device_get(tr.state.trainable)
    tr.run(progress=False)
    for a, b in zip(jax.tree_util.tree_leaves(tr.state.trainable), jax.tree_util.tree_leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    recs = read_metrics(str(tmp_path))
    assert sum(1 for r in recs if r.get("nonfinite") == 1.0) == 3


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
def test_cli_rejects_unknown_config_key(tmp_path, capsys):
    rc = cli.main(["gfn-jax", "train", "--config", os.path.join(ROOT, "configs/toy_exact.py"),
                   "--workdir", str(tmp_path), "--config.train.no_such_key=3"])
    assert rc == 2
    assert "no_such_key" in capsys.readouterr().err


def test_cli_rejects_bad_config_value(tmp_path, capsys):
    rc = cli.main(["gfn-jax", "train", "--config", os.path.join(ROOT, "configs/toy_exact.py"),
                   "--workdir", str(tmp_path), "--config.objective.name=nope"])
    err = capsys.readouterr().err
    assert rc == 1 and "objective.name='nope' is not a registered objective" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3


def test_cli_sample_without_run_is_a_clear_error(tmp_path, capsys):
    rc = cli.main(["gfn-jax", "sample", "--workdir", str(tmp_path), "--output",
                   str(tmp_path / "s.jsonl")])
    assert rc == 2 and "not a gfn-jax run directory" in capsys.readouterr().err


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    wd = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=xla_flags())
    proc = subprocess.Popen(
        [sys.executable, "-m", "gfn_jax.cli", "train", "--config",
         os.path.join(ROOT, "configs/toy_exact.py"), "--workdir", wd, "--noprogress",
         "--config.train.steps=100000", "--config.eval.num_samples=0",
         "--config.train.ckpt_every=0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = os.path.join(wd, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and len(read_metrics(metrics)) >= 5:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read().decode()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == cli.EXIT_PREEMPTED, out.decode()
    assert b"preempted at step" in out
    step = Checkpointer(os.path.join(wd, "checkpoints")).latest_step()
    assert step is not None and step >= 5
    summary = json.load(open(os.path.join(wd, "summary.json")))
    assert summary["preempted_at"] == step


# ---------------------------------------------------------------------------
# The exactly solvable task: trained samples match the target distribution
# ---------------------------------------------------------------------------
@pytest.mark.optimized
@pytest.mark.parametrize("objective", ["subtb", "tb"])
def test_toy_exact_reaches_target(tmp_path, objective):
    from gfn_jax.tasks.toy import toy_target, total_variation

    wd = str(tmp_path / objective)
    cfg = os.path.join(ROOT, "configs/toy_exact.py")
    assert cli.main(["gfn-jax", "train", "--config", cfg, "--workdir", wd, "--noprogress",
                     f"--config.objective.name={objective}", "--config.mesh.devices=1",
                     "--config.eval.num_samples=0"]) == 0
    out = str(tmp_path / "samples.jsonl")
    assert cli.main(["gfn-jax", "sample", "--workdir", wd, "--num", "10000", "--output", out,
                     "--seed", "7"]) == 0
    rows = [json.loads(l) for l in open(out)]
    assert len(rows) == 10000 and {"prompt", "text", "log_q"} <= set(rows[0])
    counts = {}
    for r in rows:
        counts[r["text"]] = counts.get(r["text"], 0) + 1
    emp = {k: v / len(rows) for k, v in counts.items()}
    target = toy_target()
    tv = total_variation(emp, target)
    assert tv < 0.05, tv
    # log_q is the policy's own probability: its empirical frequency agrees
    top = max(counts, key=counts.get)
    lq = np.mean([r["log_q"] for r in rows if r["text"] == top])
    assert np.exp(lq) == pytest.approx(emp[top], abs=0.02)


def test_rng_evaluate_metrics_and_plots(tmp_path):
    task = RandomNumberTask({})
    uniform = [{"text": str(k)} for k in range(100) for _ in range(3)]
    m = task.evaluate(uniform, str(tmp_path), "before")
    assert m["fraction_valid"] == 1.0 and m["tv_to_uniform"] == pytest.approx(0.0, abs=1e-12)
    skewed = [{"text": "7"}] * 150 + [{"text": "07"}] * 50 + [{"text": "100"}] * 100
    m = task.evaluate(skewed, str(tmp_path), "after")
    # 0.5 on "7" (want 0.01), 0.5 invalid: TV = 0.5 * (0.49 + 99 * 0.01 + 0.5)
    assert m["fraction_valid"] == pytest.approx(0.5)
    assert m["tv_to_uniform"] == pytest.approx(0.5 * (0.49 + 0.99 + 0.5))
    for name in ("rng_histogram_before.png", "rng_histogram_after.png", "rng_histogram.png"):
        path = tmp_path / name
        assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
