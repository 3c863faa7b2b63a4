"""Host-side rollouts and the reward model: replay seeded from data, schedules that count
optimizer updates, a separate reward checkpoint and a reward context other than the prompt."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gfn_jax.logprobs import PolicySpec
from gfn_jax.models import forward
from gfn_jax.models.hf import save_hf
from gfn_jax.models.registry import tiny_model
from gfn_jax.scoring import score_reward_prefixes
from gfn_jax.tasks import register_task
from gfn_jax.tasks.base import Task
from gfn_jax.tasks.toy import toy_log_reward_text
from gfn_jax.train import Trainer
from tiny import toy_config as tiny_toy_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toy_config(**overrides):
    return tiny_toy_config(**{"train.samples_per_prompt": 16, **overrides})


@pytest.mark.parametrize("lazily", [False, True])
def test_replay_is_seeded_from_the_task_data_with_true_rewards(tmp_path, lazily):
    """Eagerly at start-up, or lazily when a replay batch first needs the prompt (then the
    seeded prompts are in the checkpoint and a resumed run does not seed them twice). The
    toy run spans every (virtual) device: the seeding pass splits its rows over them
    (``parallel.split_rows``), with the same rewards."""
    tr = Trainer(toy_config(**{"task.targets_num": 200, "replay.seed_from_data": True,
                               "replay.capacity": 64, "explore.p_replay": 0.5,
                               "replay.seed_lazily": lazily}),
                 str(tmp_path), restore=False)
    assert tr.mesh.devices.size == len(jax.devices())
    assert len(tr.replay) == (0 if lazily else len({tuple(t.tokens) for t in tr.task.targets()}))
    if lazily:
        assert tr.rollouts.replay_batch([0], 8, temperature=None) is not None
        assert tr.replay_seeded == {0}
        tr.save(1, force=True)
        tr.ckpt.wait()
        n = len(tr.replay)
        again = Trainer(tr.config, str(tmp_path))
        assert again.replay_seeded == {0} and len(again.replay) == n
        again.rollouts.replay_batch([0], 8, temperature=None)
        assert len(again.replay) == n  # not seeded a second time
    entries = tr.replay.entries("0")
    texts = {tr.tokenizer.decode(list(e.tokens)) for e in entries}
    want = {tr.tokenizer.decode(list(t.tokens)) for t in tr.task.targets()}
    assert texts == want  # every distinct target, once
    for e in entries:
        z = tr.tokenizer.decode(list(e.tokens))
        assert e.log_r == pytest.approx(toy_log_reward_text(z), abs=1e-5)
    # a replay batch of the seeded buffer: stored trajectories, no behaviour log-probs
    b = tr.rollouts.replay_batch([0], 8, temperature=None)
    assert b.size == 8 and not np.asarray(b.has_behaviour).any()


def test_reward_temperature_and_lr_count_optimizer_updates(tmp_path):
    cfg = toy_config(**{"train.grad_accum": 2, "train.steps": 8, "reward.temp_start": 1.0,
                        "reward.temp_end": 0.5, "reward.temp_horizon": 4})
    tr = Trainer(cfg, str(tmp_path), restore=False)
    assert tr.total_updates == 4  # 8 micro-batches, 2 per update
    temps = []
    for step in range(8):
        temps.append(tr.temperature())
        batch, _ = tr.make_batch(step)
        tr.train_step(batch, step=step)
    # the anneal moves once per optimizer update (every 2 micro-batches), over 4 updates
    want = [1.0, 1.0, 0.875, 0.875, 0.75, 0.75, 0.625, 0.625]
    assert temps == pytest.approx(want)
    # and optax counted 4 updates: the inner Adam count of MultiSteps
    counts = [int(x) for x in jax.tree_util.tree_leaves(tr.state.opt_state)
              if np.ndim(x) == 0 and np.issubdtype(np.asarray(x).dtype, np.integer)]
    assert 4 in counts


class _ContextTask(Task):
    """Reward log p_R(z≤i ⊤ | C) with a context C different from the policy's prompt."""

    name = "ctx_test"
    DEFAULTS = {"max_len": 4}

    def train_prompts(self):
        return ["Hello there", "Hi"]

    def reward_prompts(self):
        return ["Q: say more. A: Hello there", "Q: say more. A: Hi"]

    def encode_prompt(self, text):
        return self.tokenizer.encode(text, add_bos=False)

    def policy_spec(self):
        return PolicySpec(term_ids=(self.tokenizer.eos_id,), max_len=int(self.config["max_len"]),
                          min_len=1)

    def log_reward(self, model_config, params, batch):
        r = score_reward_prefixes(model_config, params, batch.reward_prompt_tokens,
                                  batch.reward_prompt_mask, batch.tokens, batch.lengths,
                                  (self.tokenizer.eos_id,))
        return r.log_pz + r.log_pterm


def test_separate_reward_model_and_reward_context(tmp_path, monkeypatch):
    from gfn_jax import parallel

    placed = []  # what the trainer places with shardings: loaded weights come from the host
    real = parallel.shard_params
    monkeypatch.setattr(parallel, "shard_params",
                        lambda tree, sh: placed.append(jax.tree_util.tree_leaves(tree))
                        or real(tree, sh))
    register_task("ctx_test", _ContextTask)
    reward = tiny_model("llama", seed=7)
    rdir = str(tmp_path / "reward_model")
    save_hf(reward.config, reward.params, rdir, tokenizer=reward.tokenizer)
    c = toy_config(**{"model.spec": "tiny-llama", "lora.enabled": True, "lora.rank": 2,
                      "reward.model": rdir, "train.prompts_per_batch": 2,
                      "train.samples_per_prompt": 4, "objective.name": "subtb",
                      "mesh.devices": 1})
    with c.unlocked():
        c.task = {"name": "ctx_test", "max_len": 4}
    tr = Trainer(c, str(tmp_path / "run"), restore=False)
    # the policy base (a registered model) and the reward model (an HF directory) reach
    # their shardings as numpy arrays: no device held either whole on the way
    assert len(placed) >= 2
    for leaves in placed[:2]:
        assert all(type(x) is np.ndarray for x in leaves)
    assert isinstance(tr.frozen["base"]["embed"]["embedding"], jax.Array)
    batch, _ = tr.make_batch(0)
    _, log_r_final = tr.train_step(batch, 1.0, step=0)
    tok = reward.tokenizer
    eos = tok.eos_id
    seqs = []
    for r in range(batch.size):
        ctx = tr.task.reward_prompts()[int(batch.prompt_index[r])]
        n = int(batch.lengths[r])
        seqs.append(tok.encode(ctx, add_bos=False) + list(np.asarray(batch.tokens[r, :n])))
    # one causal forward over the right-padded sequences: a row's logits before its padding
    # are those of the row alone
    L = max(map(len, seqs))
    ids = np.zeros((len(seqs), L), np.int32)
    for r, seq in enumerate(seqs):
        ids[r, :len(seq)] = seq
    ids = jnp.asarray(ids)
    logits_all = np.asarray(forward(reward.config, reward.params, ids, jnp.ones_like(ids)),
                            np.float64)
    for r, seq in enumerate(seqs):
        n = int(batch.lengths[r])
        lp = jax.nn.log_softmax(logits_all[r, :len(seq)], -1)
        P = len(seq) - n
        want = sum(lp[P - 1 + t, seq[P + t]] for t in range(n)) + lp[len(seq) - 1, eos]
        assert log_r_final[r] == pytest.approx(float(want), abs=2e-4), r
    # and it is not the policy's base model scoring the policy's prompt
    base = tiny_model("llama", seed=0)
    pt = jnp.asarray(batch.prompt_tokens)
    other = score_reward_prefixes(base.config, base.params, pt, jnp.asarray(batch.prompt_mask),
                                  jnp.asarray(batch.tokens), jnp.asarray(batch.lengths), (eos,))
    n = jnp.asarray(batch.lengths)
    other_final = np.asarray(jnp.take_along_axis(other.log_pz + other.log_pterm, n[:, None],
                                                 1)[:, 0])
    assert np.max(np.abs(other_final - log_r_final)) > 1e-2


def test_posterior_diagnostics_closed_form():
    """log-mean-exp of log R − log q per prompt and the ESS fraction, against numpy."""
    from gfn_jax.step import posterior_diagnostics

    rng = np.random.default_rng(0)
    lr = rng.normal(size=8).astype(np.float32)
    lq = rng.normal(size=8).astype(np.float32)
    group = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    valid = np.array([True, True, True, True, True, False, True, True])
    d = posterior_diagnostics(jnp.asarray(lr), jnp.asarray(lq), jnp.asarray(group),
                              jnp.asarray(valid), 3)
    zs, ess = [], []
    for g in (0, 1):
        w = (lr - lq)[(group == g) & valid].astype(np.float64)
        zs.append(np.log(np.mean(np.exp(w))))
        e = np.exp(w)
        ess.append(e.sum() ** 2 / (len(e) * (e * e).sum()))
    assert float(d["iw_log_z"]) == pytest.approx(np.mean(zs), abs=1e-5)
    assert float(d["iw_ess"]) == pytest.approx(np.mean(ess), abs=1e-5)
    # a sampler exactly ∝ R: every weight equal, ESS 1 and log Z exact
    d = posterior_diagnostics(jnp.asarray(lq + 2.0), jnp.asarray(lq), jnp.asarray(group),
                              jnp.ones(8, bool), 2)
    assert float(d["iw_ess"]) == pytest.approx(1.0, abs=1e-6)
    assert float(d["iw_log_z"]) == pytest.approx(2.0, abs=1e-5)


def test_memory_plan_before_training_names_the_knobs(tmp_path, capsys, monkeypatch):
    """memory.estimate=always compiles the step and the sampler on abstract shapes first; a
    config that does not fit the planned device memory is refused before training, naming
    what to change (here the sampler's evaluation draw of 5,000 rows is the larger phase)."""
    from gfn_jax import cli

    tr = Trainer(toy_config(**{"memory.estimate": "always"}), str(tmp_path / "a"),
                 restore=False)
    assert tr.memory_estimate is not None and tr.memory_estimate.total_bytes > 0
    rc = cli.main(["gfn-jax", "train", "--config", os.path.join(ROOT, "configs/toy_exact.py"),
                   "--workdir", str(tmp_path / "b"), "--config.memory.estimate=always",
                   "--config.memory.device_gb=0.000001", "--config.train.steps=1"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert "sampling needs" in err and "(5000 now, from eval.batch_size)" in err
    assert "model.decode_layers='scanned'" in err
    # the plan comes before anything large is placed on the devices: a config that cannot
    # fit is refused before the optimizer state is made
    import gfn_jax.train as train_mod
    from gfn_jax.memory import DoesNotFitError

    def no_optimizer(*a, **k):
        raise AssertionError("the optimizer was built before the memory plan refused the run")

    monkeypatch.setattr(train_mod, "build_optimizer", no_optimizer)
    with pytest.raises(DoesNotFitError):
        Trainer(toy_config(**{"memory.estimate": "always", "memory.device_gb": 1e-6}),
                str(tmp_path / "c"), restore=False)
    assert not os.path.exists(tmp_path / "b" / "checkpoints")


def test_plan_command_reads_no_weights(tmp_path, capsys):
    """``gfn-jax plan`` sets a run up as train does (task, tokenizer, prompt lengths, mesh)
    and compiles the step and the sampler on abstract shapes: it works on an HF directory
    whose weight file is gone (train cannot start there), prints the plan, writes it as
    JSON, and fails naming the keys when the device memory given is too small."""
    from gfn_jax import cli

    model = tiny_model("llama", seed=3)
    hf_dir = str(tmp_path / "hf")
    save_hf(model.config, model.params, hf_dir, tokenizer=model.tokenizer)
    own = tmp_path / "own.txt"
    own.write_text("".join(f"prompt number {i} \n" for i in range(4)))
    base = ["--config", os.path.join(ROOT, "configs/continuation.py"), "--config.task.num_eval=2",
            f"--config.model.spec={hf_dir}", "--config.lora.rank=2",
            f"--config.task.data_path={own}", "--config.task.max_len=3",
            "--config.task.diversity_encoder=", "--config.train.prompts_per_batch=2",
            "--config.train.samples_per_prompt=4", "--config.eval.num_samples=0",
            "--config.mesh.devices=1"]
    os.remove(os.path.join(hf_dir, "model.safetensors"))
    out_json = str(tmp_path / "plan.json")
    capsys.readouterr()
    assert cli.main(["gfn-jax", "plan", *base, "--config.memory.device_gb=1",
                     "--json", out_json]) == 0
    out = capsys.readouterr().out
    assert "train step memory per device" in out and "sampling memory per device" in out
    assert "fits 90% of 1.0 GB" in out
    with open(out_json) as f:
        plan = json.load(f)
    assert plan["sampler"]["knobs"]["sampler.rows"] == 8
    assert plan["total_bytes"] == max(plan["step_bytes"], plan["sampling_bytes"]) > 0
    # too small a device: refused with the knobs, exit 1, no traceback
    assert cli.main(["gfn-jax", "plan", *base, "--config.memory.device_gb=0.000001"]) == 1
    err = capsys.readouterr().err
    assert "needs" in err and "task.max_len (now 3)" in err and "Traceback" not in err
    # training does need the weights: a clear error naming the missing file
    rc = cli.main(["gfn-jax", "train", *base, "--workdir", str(tmp_path / "run"),
                   "--config.train.steps=1", "--noprogress"])
    assert rc == 1 and "safetensors" in capsys.readouterr().err
