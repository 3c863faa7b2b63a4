"""Registered objectives: a new objective is one registration; incompatible configs fail at
validation; every built-in objective runs through the CLI, resumes exactly and shards."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gfn_jax import cli
from gfn_jax import objectives as obj
from gfn_jax.checkpoint import Checkpointer
from gfn_jax.defaults import validate_config
from gfn_jax.metrics import read_metrics
from gfn_jax.objective_registry import (Needs, Objective, get_objective, objective_names,
                                        register_objective, unregister_objective)
from gfn_jax.train import Trainer
from tiny import toy_config as tiny_toy_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "configs", "toy_exact.py")

# per-objective overrides that make a tiny, valid run (SFT needs data, RL is on-policy)
OBJECTIVE_OVERRIDES = {
    "subtb": {},
    "db": {},
    "tb": {"objective.log_z": "conditional"},
    "sft": {"task.targets_num": 64},
    "reinforce": {"explore.p_tempered": 0.0},
    "ppo": {"objective.ppo_epochs": 2, "objective.ppo_minibatches": 2},
}


def toy_config(**overrides):
    return tiny_toy_config(**{"train.samples_per_prompt": 16, **overrides})


def _flags(overrides):
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def test_builtin_objectives_are_registered():
    assert set(OBJECTIVE_OVERRIDES) <= set(objective_names())
    assert get_objective("tb").needs_for({}).log_z
    assert get_objective("subtb").balance and get_objective("db").balance
    assert not get_objective("sft").needs_for({}).reward
    ppo = get_objective("ppo")
    assert ppo.on_policy and ppo.uses_behaviour_logprobs and ppo.prepare is not None
    assert ppo.epochs_for({"ppo_epochs": 3}) == 3


def test_unknown_objective_names_close_matches():
    with pytest.raises(ValueError, match=r"objective.name='subtbb'.*did you mean 'subtb'"):
        get_objective("subtbb")


@pytest.mark.parametrize("objective,overrides,match", [
    ("ppo", {"explore.p_replay": 0.2}, r"on-policy only: set explore.p_replay to 0"),
    ("reinforce", {"explore.p_tempered": 0.25},
     r"on-policy only: set explore.p_tempered to 0"),
    ("reinforce", {"explore.p_tempered": 0.0, "objective.baseline": "median"},
     r"objective.baseline"),
    ("ppo", {"objective.ppo_minibatches": 3}, r"objective.ppo_minibatches=3"),
    ("tb", {"objective.log_z": "mlp"}, r"objective.log_z"),
    ("sft", {"objective.sft_source": "replay"}, r"objective.sft_source"),
    ("subtb", {"train.log_every": 0}, r"train.log_every must be >= 1"),
    ("subtb", {"optim.lr": -1.0}, r"optim.lr"),
    ("subtb", {"train.keep_checkpoints": 0}, r"train.keep_checkpoints"),
])
def test_incompatible_configs_fail_at_validation(objective, overrides, match):
    c = toy_config(**{"objective.name": objective, **overrides})
    with pytest.raises(ValueError, match=match):
        validate_config(c)


def test_unknown_task_key_names_the_task():
    c = toy_config()
    with c.task.unlocked():
        c.task.w_aa = 1.0
    with pytest.raises(ValueError, match=r"task 'toy_exact'.*task.w_aa.*did you mean task.w_a"):
        validate_config(c)


def test_task_keys_are_overridable_from_the_command_line(tmp_path):
    # every key of the task's schema exists in the config, so the flag parser accepts it
    wd = str(tmp_path / "run")
    assert cli.main(["gfn-jax", "train", "--config", TOY, "--workdir", wd, "--noprogress",
                     "--config.train.steps=1", "--config.eval.num_samples=0",
                     "--config.task.w_a=2.0"]) == 0
    assert json.load(open(os.path.join(wd, "config.json")))["task"]["w_a"] == 2.0


def test_a_new_objective_is_one_registration(tmp_path):
    """A tiny objective registered here (no library file touched) trains through the CLI:
    maximise E_q[log R] with a plain score-function estimator."""
    seen = {}

    def loss(x):
        seen["traced"] = True
        lq = x.log_q
        adv = x.log_r_final - jnp.mean(x.log_r_final)
        return -jnp.mean(jax.lax.stop_gradient(adv) * lq), {"my_adv": jnp.mean(jnp.abs(adv))}

    register_objective(Objective(name="test_score_fn", loss=loss, needs=Needs(reward=True),
                                 on_policy=True, description="test objective"))
    try:
        wd = str(tmp_path / "run")
        assert cli.main(["gfn-jax", "train", "--config", TOY, "--workdir", wd, "--noprogress",
                         "--config.objective.name=test_score_fn", "--config.train.steps=3",
                         "--config.train.log_every=1",
                         "--config.explore.p_tempered=0", "--config.eval.num_samples=0"]) == 0
        recs = read_metrics(os.path.join(wd, "metrics.jsonl"))
        assert [r["step"] for r in recs] == [0, 1, 2]
        assert all(np.isfinite(r["my_adv"]) and r["my_adv"] > 0 for r in recs)
        assert seen["traced"]
        # on-policy: its validation rejects tempered exploration like the built-ins
        with pytest.raises(ValueError, match="on-policy only"):
            validate_config(toy_config(**{"objective.name": "test_score_fn"}))
    finally:
        unregister_objective("test_score_fn")


def _trainable(wd):
    step = Checkpointer(os.path.join(wd, "checkpoints")).latest_step()
    sub, meta = Checkpointer(os.path.join(wd, "checkpoints")).restore_subset(
        keys=["trainable", "log_z", "step"])
    return step, jax.device_get(sub), meta


@pytest.mark.parametrize("objective", sorted(OBJECTIVE_OVERRIDES))
def test_every_objective_runs_resumes_exactly_and_shards(tmp_path, objective):
    over = {"objective.name": objective, **OBJECTIVE_OVERRIDES[objective],
            "train.ckpt_every": 1, "eval.num_samples": 0, "model.init_std": 0.1,
            "train.samples_per_prompt": 16}
    # the resume check on one device (a convergence-free exactness check; the 8 virtual CPU
    # devices would triple its step time), the sharding check below on 8
    res = {**over, "mesh.devices": 1}
    base = ["gfn-jax", "train", "--config", TOY, "--noprogress"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    # two steps straight through the CLI
    assert cli.main(base + ["--workdir", a, "--config.train.steps=2"] + _flags(res)) == 0
    # the same run stopped after one step (as a preemption would), then the same command
    # resumes it to two steps
    Trainer(toy_config(**res, **{"train.steps": 2}), b).run(progress=False, until=1)
    assert Checkpointer(os.path.join(b, "checkpoints")).latest_step() == 1
    assert cli.main(base + ["--workdir", b, "--config.train.steps=2"] + _flags(res)) == 0
    sa, ta, ma = _trainable(a)
    sb, tb_, mb = _trainable(b)
    assert sa == sb == 2
    for x, y in zip(jax.tree_util.tree_leaves(ta), jax.tree_util.tree_leaves(tb_)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert ma["hyper"] == mb["hyper"]
    la = read_metrics(os.path.join(a, "metrics.jsonl"))
    lb = read_metrics(os.path.join(b, "metrics.jsonl"))
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=0, abs=0)

    # one rollout on 8 CPU devices (2 x 2 x 2 mesh) equals one device
    def one(devices, mesh, wd):
        cfg = toy_config(**over, **mesh)
        tr = Trainer(cfg, wd, restore=False, devices=devices)
        batch, _ = tr.make_batch(0)
        m, _ = tr.train_step(batch, 1.0, step=0)
        return m["loss"], jax.device_get(tr.state.trainable), jax.device_get(tr.state.log_z)

    l1, p1, z1 = one(jax.devices()[:1], {"mesh.data": 1}, str(tmp_path / "d1"))
    l8, p8, z8 = one(None, {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2},
                     str(tmp_path / "d8"))
    assert l8 == pytest.approx(l1, abs=1e-5, rel=1e-5)
    for x, y in zip(jax.tree_util.tree_leaves((p8, z8)), jax.tree_util.tree_leaves((p1, z1))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-5)


def test_ppo_records_behaviour_logprobs_and_clips(tmp_path):
    """The sampler's behaviour log-probs are those of the tempered distribution that drew the
    samples (not the policy's), and PPO's ratio against them engages clipping."""
    cfg = toy_config(**{"objective.name": "ppo", "objective.ppo_epochs": 4,
                        "objective.ppo_minibatches": 2, "explore.p_on_policy": 0.0,
                        "explore.p_tempered": 1.0, "explore.temp_min": 2.0,
                        "explore.temp_max": 2.0, "optim.lr": 0.03, "optim.warmup_steps": 0})
    tr = Trainer(cfg, str(tmp_path), restore=False)
    batch, kind = tr.make_batch(0)
    assert kind == "tempered"
    pol = obj.sequence_logprob(batch.old_log_pf, batch.old_log_pterm, batch.lengths,
                               batch.action_mask)
    beh = obj.sequence_logprob(batch.beh_log_pf, batch.beh_log_pterm, batch.lengths,
                               batch.action_mask)
    assert not np.allclose(np.asarray(pol), np.asarray(beh), atol=1e-3)
    # an on-policy batch's behaviour is the policy itself
    on = tr.rollouts.draw(tr.policy, jax.random.PRNGKey(3), [0], 16, {"temperature": 1.0})
    np.testing.assert_allclose(np.asarray(on.beh_log_pf), np.asarray(on.old_log_pf), atol=1e-5)
    np.testing.assert_allclose(np.asarray(on.beh_log_pterm), np.asarray(on.old_log_pterm),
                               atol=1e-5)
    m, lrf = tr.train_step(batch, 1.0, step=0)
    assert m["clip_frac"] > 0
    assert np.all(np.isfinite(lrf)) and m["approx_kl_old"] >= 0
